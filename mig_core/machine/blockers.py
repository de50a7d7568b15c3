"""Migration blockers: reasons this machine must not migrate or snapshot now (QEMU's migrate_add_blocker).

Host software, devices and mig itself register a blocker with its reason (and the migration modes it
blocks, all by default). While one is registered, ``migrate`` is refused with the newest one's text and
``snapshot-save`` fails with it; ``query-migrate`` lists every reason in ``blocked-reasons``. QEMU refuses
a blocker while a migration or a snapshot runs (``disallowing migration blocker (migration/snapshot in
progress) for: <reason>``); a host that cannot wait registers it with ``force=True`` instead, and the
running precopy migration then fails with the reason (a postcopy migration cannot: the destination
already runs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from mig_core.machine.device import Device
from mig_core.schema.migration import MigMode

log = structlog.get_logger("mig.blockers")

ALL_MODES = frozenset(MigMode)


class BlockerRefused(Exception):
    """The blocker could not be registered now; ``str()`` is QEMU's text."""


@dataclass(eq=False, frozen=True)
class Blocker:
    """One registered reason; the handle ``remove`` takes."""

    reason: str
    modes: frozenset[MigMode] = ALL_MODES


class MigrationBlockers:
    """The machine's blockers, newest first (QEMU prepends, and reports the list head)."""

    def __init__(self, devices: Callable[[], Iterable[Device]] = tuple) -> None:
        #: the machine's devices (an unmigratable one blocks as a blocker does)
        self.devices = devices
        self._blockers: list[Blocker] = []
        self._lock = threading.Lock()
        #: What is running that a new blocker would have to stop: None (nothing), or "migration",
        #: "postcopy" or "snapshot". The manager sets it.
        self.running: Callable[[], str | None] = lambda: None
        #: Called with the reason when a forced blocker must end the running migration.
        self.fail_running: Callable[[str], None] = lambda reason: None

    def add(self, reason: str, *, modes: Iterable[MigMode] | None = None, force: bool = False) -> Blocker:
        """Register ``reason``; BlockerRefused while a migration or snapshot runs, unless ``force``."""
        if not reason:
            raise ValueError("a migration blocker needs a reason")
        blocker = Blocker(reason, frozenset(modes) if modes is not None else ALL_MODES)
        running = self.running()
        if running is not None and (not force or running == "postcopy"):
            raise BlockerRefused(f"disallowing migration blocker (migration/snapshot in progress) for: {reason}")
        with self._lock:
            self._blockers.insert(0, blocker)
        log.info("migration_blocker_added", reason=reason, modes=sorted(m.value for m in blocker.modes),
                 forced_while=running)
        if running == "migration":
            self.fail_running(reason)
        return blocker

    def remove(self, blocker: Blocker) -> None:
        """Unregister ``blocker`` (nothing happens if it is not registered)."""
        with self._lock:
            if blocker in self._blockers:
                self._blockers.remove(blocker)
                log.info("migration_blocker_removed", reason=blocker.reason)

    def reasons(self, mode: MigMode) -> list[str]:
        """The registered reasons that block ``mode``, newest first."""
        with self._lock:
            return [b.reason for b in self._blockers if mode in b.modes]

    def _unmigratable(self) -> list[str]:
        return [d.id for d in self.devices() if d.unmigratable]

    def blocked_reasons(self, mode: MigMode) -> list[str]:
        """query-migrate's ``blocked-reasons``: unmigratable devices first, then the blockers."""
        return [f"non-migratable device: {d}" for d in self._unmigratable()] + self.reasons(mode)

    def error(self, mode: MigMode) -> str | None:
        """Why ``migrate`` (or ``snapshot-save``) must be refused now, in QEMU's words; None if it need not."""
        devices = self._unmigratable()
        if devices:
            return f"State blocked by non-migratable device '{devices[0]}'"
        reasons = self.reasons(mode)
        return reasons[0] if reasons else None
