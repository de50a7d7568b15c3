"""The pluggy plugin manager and ``Hooks``, the one typed way mig calls its hooks.

Hook plugins come from three places, all checked the same way: mig's built-ins
(``DEFAULT_PLUGINS``), the ``mig_core.hooks`` entry-point group, and objects an
embedding host registers with ``Hooks.register``. A hook implementation whose
name matches no hookspec (a misspelt ``mig_swichover``) is refused: an
entry-point plugin is skipped with an error in the log, a host's own object
raises ``HookValidationError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy
import structlog

from mig_core.plugin import builtin_hooks, hookspecs
from mig_core.plugin.registry import PluginNotFound, PluginRegistry

if TYPE_CHECKING:
    from mig_core.schema.common import RunState, Side
    from mig_core.schema.migration import MigrationStatus

log = structlog.get_logger("mig.hooks")

GROUP = "mig_core.hooks"

#: Built-in behaviour registered exactly like a third-party plugin.
DEFAULT_PLUGINS = (builtin_hooks,)


class HookValidationError(ValueError):
    """A hook plugin that cannot be registered: an unknown hook name or a wrong signature."""


def _register_checked(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    """Register ``plugin`` and check every hookimpl names a hookspec; on failure nothing stays registered."""
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as e:
        raise HookValidationError(str(e)) from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        pm.unregister(plugin)
        raise HookValidationError(f"{e} (mig's hooks: {', '.join(sorted(_spec_names()))})") from None


def _spec_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("mig_")]


def make_plugin_manager(registry: PluginRegistry | None = None) -> pluggy.PluginManager:
    """A manager with every hookspec, the built-ins, and each ``mig_core.hooks`` entry point that loads."""
    pm = pluggy.PluginManager("mig")
    pm.add_hookspecs(hookspecs)
    for plugin in DEFAULT_PLUGINS:
        _register_checked(pm, plugin, f"builtin:{plugin.__name__.rsplit('.', 1)[-1]}")
    registry = registry or PluginRegistry.from_environment()
    for name in registry.names(GROUP):
        try:
            plugin = registry.load(GROUP, name)
        except PluginNotFound as e:
            log.error("hook_plugin_skipped", name=name, error=str(e))
            continue
        try:
            _register_checked(pm, plugin, name)
        except HookValidationError as e:
            log.error("hook_plugin_rejected", name=name, error=str(e))
    return pm


class Hooks:
    """Calls mig's hooks with typed arguments (one method per hookspec in ``mig_core.plugin.hookspecs``)."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a host's own hook object; ``HookValidationError`` if a hookimpl matches no hookspec."""
        _register_checked(self.pm, plugin, name)

    def status_changed(self, side: Side, old: MigrationStatus, new: MigrationStatus, migration_id: str) -> None:
        self.pm.hook.mig_status_changed(side=side, old=old, new=new, migration_id=migration_id)

    def runstate_changed(self, old: RunState, new: RunState, running: bool) -> None:
        self.pm.hook.mig_runstate_changed(old=old, new=new, running=running)

    def event(self, name: str, data: dict[str, Any] | None, timestamp: tuple[int, int]) -> None:
        self.pm.hook.mig_event(name=name, data=data, timestamp=timestamp)

    def pass_completed(self, migration_id: str, pass_number: int, dirty_bytes: int) -> None:
        self.pm.hook.mig_pass_completed(migration_id=migration_id, pass_number=pass_number, dirty_bytes=dirty_bytes)

    def switchover(self, migration_id: str, side: Side) -> None:
        self.pm.hook.mig_switchover(migration_id=migration_id, side=side)

    def announce(self, round: int, rounds: int) -> None:
        self.pm.hook.mig_announce(round=round, rounds=rounds)
