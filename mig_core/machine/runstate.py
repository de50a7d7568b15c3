"""The machine's run state (QEMU's RunState) and its change notifications.

Devices, I/O threads and the vCPU controller register listeners so they quiesce
when the machine stops and resume when it runs; each change between running and
not running also yields a ``STOP`` or ``RESUME`` event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from mig_core.errors import QMPError
from mig_core.schema.common import RunState

log = structlog.get_logger("mig.runstate")

#: (old, new, running) -> None; called after the change is applied.
RunStateListener = Callable[[RunState, RunState, bool], None]


class RunStateMachine:
    """Holds the run state; ``stop``/``cont`` implement the QMP commands of the same names."""

    def __init__(self, initial: RunState = RunState.RUNNING) -> None:
        self._state = initial
        #: Whether an incoming migration starts the machine when it completes (cleared by -S or stop).
        self.autostart = True
        self._lock = threading.RLock()
        self._listeners: list[RunStateListener] = []

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def add_listener(self, fn: RunStateListener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: RunStateListener) -> None:
        self._listeners.remove(fn)

    def set(self, new: RunState) -> RunState:
        """Enter ``new``; listeners hear of every change, STOP/RESUME only of running edges."""
        with self._lock:
            old = self._state
            self._state = new
            running = self.running
            if old is not new:
                log.info("runstate_changed", old=old.value, new=new.value)
                for fn in list(self._listeners):
                    fn(old, new, running)
        return old

    def stop(self, state: RunState = RunState.PAUSED) -> None:
        """Stop the machine (``stop`` command); a stopped machine just changes state name."""
        with self._lock:
            if self._state is RunState.INMIGRATE:
                # QEMU remembers the request and stays paused after the incoming migration.
                self.autostart = False
                return
            if self.running or self._state is RunState.PRELAUNCH:
                self.set(state)

    def cont(self) -> None:
        """Resume the machine (``cont`` command) with QEMU's refusals (qmp_cont).

        Between the final stop of a migration and its end the run state is finish-migrate, and nothing
        may resume the vCPUs then: the device state being saved and the last RAM pass would no longer
        be the state the destination continues from.
        """
        with self._lock:
            st = self._state
            if st in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED):
                raise QMPError("Resetting the Virtual Machine is required")
            if st is RunState.SUSPENDED:
                return
            if st is RunState.FINISH_MIGRATE:
                raise QMPError("Migration is not finalized yet")
            if st is RunState.COLO:
                raise QMPError("COLO checkpoint in progress")
            if st is RunState.INMIGRATE:
                # QEMU only remembers the request: the machine starts when the incoming migration ends
                self.autostart = True
                return
            if self.running:
                return
            self.set(RunState.RUNNING)
