"""Unplug before migration: devices that must be gone before the source may go (QEMU's failover primary NIC).

In setup each device may start its own removal (``unplug_before_migration``); if any did, the source
waits in ``wait-unplug``, polling every 250 ms, and announces each finished removal (UNPLUG_PRIMARY).
A migration that then fails or is cancelled puts every such device back (``replug``), after waiting up
to 30 s for a removal still under way, as QEMU does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from mig_core.engine.context import StatusCell
from mig_core.machine.device import Device, DeviceRegistry
from mig_core.schema.migration import MigrationStatus as S

log = structlog.get_logger("mig.unplug")

#: QEMU polls the guest's unplug every 250 ms.
POLL_S = 0.25
#: How long a failed or cancelled migration still waits for an unplug under way before re-plugging.
FAILURE_WAIT_S = 30.0


class Unplugs:
    """The devices one outgoing migration asked to leave, and their way back."""

    def __init__(self, devices: DeviceRegistry, unplugged: Callable[[str], None]) -> None:
        self._devices = devices
        self._announce = unplugged
        self.requested: list[Device] = []
        self._announced: set[int] = set()

    def request(self) -> None:
        """Ask every device to start leaving; remember those that must be waited for."""
        for dev in self._devices:
            if dev.unplug_before_migration():
                self.requested.append(dev)
                log.info("unplug_requested", device=dev.id, instance=dev.instance)

    def pending(self) -> list[Device]:
        """The requested devices still leaving; each that finished since the last call is announced."""
        still = []
        for dev in self.requested:
            if dev.unplug_pending():
                still.append(dev)
            elif id(dev) not in self._announced:
                self._announced.add(id(dev))
                log.info("unplugged", device=dev.id, instance=dev.instance)
                self._announce(dev.id)
        return still

    def wait(self, status: StatusCell, check: Callable[[], None]) -> None:
        """``setup → wait-unplug``, poll until every removal finished, then back to a state setup can leave.

        ``check`` raises to stop waiting (a cancel); the status then stays where the canceller put it."""
        if not self.requested or not self.pending():
            return
        if not status.cas(S.SETUP, S.WAIT_UNPLUG):
            check()
            return
        while self.pending():
            check()
            time.sleep(POLL_S)
        check()

    def replug(self) -> None:
        """The migration failed or was cancelled: give every requested device back (after its removal ended)."""
        if not self.requested:
            return
        deadline = time.monotonic() + FAILURE_WAIT_S
        while self.pending() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self.pending():
            log.warning("partially_unplugged_device_on_failure",
                        devices=[d.id for d in self.pending()])
        for dev in self.requested:
            try:
                dev.replug()
                log.info("replugged", device=dev.id, instance=dev.instance)
            except Exception:  # noqa: BLE001 - one device's failure must not keep the others unplugged
                log.exception("replug_failed", device=dev.id, instance=dev.instance)
        self.requested.clear()
