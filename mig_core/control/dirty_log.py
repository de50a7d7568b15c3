"""The global dirty log (``xen-set-global-dirty-log``): a consumer of the machine's dirty tracker that
records every write while it is on, for whoever reads it (an embedder calls ``collect``)."""

from __future__ import annotations

import threading

import structlog

from mig_core.errors import QMPError
from mig_core.ext.dirty_tracker import DirtyConsumer, DirtyReport
from mig_core.machine.machine import Machine

log = structlog.get_logger("mig.dirty_log")


class GlobalDirtyLog:
    """On or off; switching it on twice (or off twice) is no error, as QEMU's."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.consumer: DirtyConsumer | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.consumer is not None

    def set(self, enable: bool) -> None:
        with self._lock:
            if enable and self.consumer is None:
                try:
                    tracker = self.machine.tracker()
                except ValueError as e:
                    raise QMPError(f"Cannot start the global dirty log: {e}") from None
                self.consumer = tracker.consumer("global-dirty-log", sends=False)
                self.consumer.collect()  # everything up to now is the baseline, not the log
            elif not enable and self.consumer is not None:
                self.consumer.close()
                self.consumer = None
        log.info("global_dirty_log", enabled=enable)

    def collect(self) -> DirtyReport:
        """Pages written since the log was switched on or last collected; QMPError while it is off."""
        consumer = self.consumer
        if consumer is None:
            raise QMPError("The global dirty log is off")
        return consumer.collect()
