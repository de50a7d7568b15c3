"""Every lifecycle hook of mig, in one typed module (pluggy hookspecs, prefixed ``mig_``).

Implement any of these with ``@mig_core.hookimpl`` on a module or an
object, and register it either through the ``mig_core.hooks`` entry-point group
of a distribution, or, from an embedding host, with
``MigrationManager.hooks.register(obj)``. An implementation whose name matches no
hookspec here is refused (the entry point is skipped with an error in the log;
``hooks.register`` raises). All hooks are observers: every implementation is
called, return values are ignored unless a hook says otherwise. The core calls
them only through ``mig_core.plugin.hooks.Hooks``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from mig_core.schema.common import RunState, Side
    from mig_core.schema.migration import MigrationStatus

hookspec = pluggy.HookspecMarker("mig")
hookimpl = pluggy.HookimplMarker("mig")


# -- status and run state -----------------------------------------------------


@hookspec
def mig_status_changed(side: Side, old: MigrationStatus, new: MigrationStatus, migration_id: str) -> None:
    """A migration changed status on this side (source or destination).

    Called from the thread that made the change, for every change, whether or
    not the ``events`` capability is on.
    """


@hookspec
def mig_runstate_changed(old: RunState, new: RunState, running: bool) -> None:
    """The machine's run state changed (e.g. running → paused, inmigrate → running)."""


@hookspec
def mig_event(name: str, data: dict[str, Any] | None, timestamp: tuple[int, int]) -> None:
    """A QMP event was emitted to clients (``timestamp`` is seconds, microseconds)."""


# -- migration lifecycle --------------------------------------------------------


@hookspec
def mig_pass_completed(migration_id: str, pass_number: int, dirty_bytes: int) -> None:
    """The source synchronised its dirty bitmap (one MIGRATION_PASS); called in the migration thread."""


@hookspec
def mig_switchover(migration_id: str, side: Side) -> None:
    """The machine stopped for switchover (source) or is about to resume after loading (destination)."""


@hookspec
def mig_announce(round: int, rounds: int) -> None:
    """The destination announces its new location; called ``announce-rounds`` times after switchover."""
