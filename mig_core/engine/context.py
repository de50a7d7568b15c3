"""What a migration's engine may see of the control plane, and nothing more.

The manager builds one ``EngineContext`` per migration and hands it to the
source or destination engine; the engine never holds the manager. Everything
here is typed by what the engine needs (a status it may move, a place to put
the first error, the live parameters), so the control plane can change behind
it without the engine reaching into its fields.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mig_core.engine.colo.state import ColoState
from mig_core.engine.dirtylimit import DirtyLimiter
from mig_core.engine.globalstate import GlobalState
from mig_core.machine.machine import Machine
from mig_core.plugin.hooks import Hooks
from mig_core.plugin.registry import PluginRegistry
from mig_core.schema.common import Side
from mig_core.schema.migration import MigrationCapability, MigrationStatus


class StatusCell(Protocol):
    """One side's migration status as the engine may move it: read it, compare-and-set it."""

    @property
    def side(self) -> Side: ...

    @property
    def state(self) -> MigrationStatus: ...

    def cas(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """Move from ``old`` to ``new`` if the status is still ``old``; False if it changed meanwhile."""
        ...


def _ignore_failure(error: str, exit_on_error: bool) -> None:
    """The default ``incoming_failed``: nothing beyond the failed status."""


@dataclass(frozen=True)
class EngineContext:
    """The narrow view of the control plane one migration's engine gets (source or destination)."""

    machine: Machine
    status: StatusCell
    migration_id: str
    #: Capabilities: a snapshot for the source (fixed at ``migrate``); the destination reads them live,
    #: because QEMU lets them be set between ``migrate-incoming`` and the source's connection.
    capabilities: Callable[[], Mapping[MigrationCapability, bool]]
    #: The current parameter values (``migrate-set-parameters`` may change some during a migration).
    parameters: Callable[[], Mapping[str, Any]]
    #: Keeps the first error of this migration for query-migrate's ``error-desc``.
    set_error: Callable[[str], None]
    hooks: Hooks
    registry: PluginRegistry
    global_state: GlobalState
    #: A dirty-bitmap sync ended pass ``number`` finding ``dirty_bytes`` (MIGRATION_PASS, hooks).
    pass_completed: Callable[[int, int], None] = lambda number, dirty_bytes: None
    #: A device's unplug before migration finished (the source emits UNPLUG_PRIMARY with its id).
    device_unplugged: Callable[[str], None] = lambda device_id: None
    #: The source's dirty-limit machinery (convergence by dirty-limit uses it); None on a destination.
    dirty_limiter: DirtyLimiter | None = None
    #: The destination's listener closed: query-migrate stops showing its socket address.
    listener_closed: Callable[[], None] = lambda: None
    #: The destination's load failed: ``(error, exit_on_error)``; the host decides what follows.
    incoming_failed: Callable[[str, bool], None] = _ignore_failure
    #: Postcopy: pages sent after each requested page (the destination likely touches them next).
    postcopy_prefetch_pages: int = 0
    #: A connection for the postcopy page server to the host's monitor front, which answers QMP for it
    #: while the host is stopped by a fault (None: the host has no front).
    front_link: Callable[[], socket.socket | None] = lambda: None
    #: The TLS a postcopy page server's migrate-recover listener uses: the destination's credentials
    #: (described) and tls-authz, taken at the switch (None: the destination does not use TLS).
    recovery_tls: Callable[[], dict[str, Any] | None] = lambda: None
    #: COLO's failover status and figures, shared with the control plane (None: this host has no COLO)
    colo: ColoState | None = None

    def capability(self, cap: MigrationCapability) -> bool:
        return bool(self.capabilities().get(cap, False))

    def parameter(self, name: str) -> Any:
        return self.parameters()[name]
