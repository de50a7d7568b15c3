"""The pluggy plugin manager: mig's hookspecs, its built-in hook plugins and third-party ones."""

from __future__ import annotations

import pluggy
import structlog

from mig_core import builtin_hooks, hookspecs
from mig_core.plugin_registry import PluginNotFound, PluginRegistry

log = structlog.get_logger("mig.hooks")

#: Built-in behaviour registered exactly like a third-party plugin.
DEFAULT_PLUGINS = (builtin_hooks,)


def make_plugin_manager(registry: PluginRegistry | None = None) -> pluggy.PluginManager:
    """A manager with every hookspec, the built-ins, and each ``mig_core.hooks`` entry point that loads."""
    pm = pluggy.PluginManager("mig")
    pm.add_hookspecs(hookspecs)
    for plugin in DEFAULT_PLUGINS:
        pm.register(plugin, name=f"builtin:{plugin.__name__.rsplit('.', 1)[-1]}")
    registry = registry or PluginRegistry.from_environment()
    for name in registry.names("mig_core.hooks"):
        try:
            plugin = registry.load("mig_core.hooks", name)
        except PluginNotFound as e:
            log.error("hook_plugin_skipped", name=name, error=str(e))
            continue
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as e:
            log.error("hook_plugin_rejected", name=name, error=str(e))
    return pm
