"""MigrationStatus transitions for the source and the destination side.

Every change is a compare-and-swap from an expected old state: one that loses a
race (``migrate_cancel`` moved the state first) is skipped silently and emits
nothing, as in QEMU. A change that the table does not allow is a bug and raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from mig_core.schema.common import Side
from mig_core.schema.migration import MigrationStatus as S

__all__ = ["Side", "IllegalTransition", "StatusMachine", "SOURCE_TRANSITIONS", "DESTINATION_TRANSITIONS",
           "RUNNING_STATES", "POSTCOPY_STATES"]


class IllegalTransition(RuntimeError):
    """A status change that the transition table forbids."""


_IDLE = (S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED)

SOURCE_TRANSITIONS: dict[S, frozenset[S]] = {
    **{s: frozenset({S.SETUP}) for s in _IDLE},
    S.SETUP: frozenset({S.FAILED, S.CANCELLING, S.WAIT_UNPLUG, S.ACTIVE, S.COMPLETED}),
    S.WAIT_UNPLUG: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.FAILED, S.CANCELLING, S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED}),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.COLO, S.POSTCOPY_ACTIVE, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.POSTCOPY_PAUSED, S.FAILED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER_SETUP, S.FAILED}),
    S.POSTCOPY_RECOVER_SETUP: frozenset({S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED}),
    S.COLO: frozenset({S.COMPLETED, S.CANCELLING, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
}
"""Source side (9.1 states). setup→completed is the snapshot path; active→completed background snapshots."""

DESTINATION_TRANSITIONS: dict[S, frozenset[S]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED}),
    S.ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_ACTIVE, S.COLO}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED}),
    S.COLO: frozenset({S.COMPLETED, S.FAILED}),
}
"""Destination side: an incoming migration runs once per process."""

#: States in which a source migration "is running" (blocks migrate and capability changes).
RUNNING_STATES = frozenset({S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
                            S.POSTCOPY_RECOVER, S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG, S.CANCELLING, S.COLO})
POSTCOPY_STATES = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER})

Listener = Callable[[Side, S, S], None]


class StatusMachine:
    """The status of one side of a migration, changed only along its transition table."""

    def __init__(self, side: Side, on_change: Listener | None = None) -> None:
        self.side = side
        self.table = SOURCE_TRANSITIONS if side is Side.SOURCE else DESTINATION_TRANSITIONS
        self._state = S.NONE
        self._lock = threading.Lock()
        self._on_change = on_change
        self._changed = threading.Condition(self._lock)

    @property
    def state(self) -> S:
        return self._state

    def _check(self, old: S, new: S) -> None:
        if new not in self.table.get(old, frozenset()):
            raise IllegalTransition(f"{self.side.value} migration status {old.value} -> {new.value} is not allowed")

    def cas(self, old: S, new: S) -> bool:
        """Move ``old`` → ``new`` if the status is still ``old``; False (and no event) if it lost a race."""
        self._check(old, new)
        with self._lock:
            if self._state is not old:
                return False
            self._state = new
            self._changed.notify_all()
        if self._on_change is not None:
            self._on_change(self.side, old, new)
        return True

    def set(self, new: S) -> S:
        """Move from whatever the current status is to ``new``; returns the old status."""
        while True:
            old = self._state
            if self.cas(old, new):
                return old

    def wait_for(self, states: AbstractSet[S], timeout: float | None = None) -> bool:
        """Block until the status is one of ``states``; False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._state in states, timeout)
