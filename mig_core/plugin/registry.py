"""Find, select and load plugins from mig's entry-point groups.

Listing uses the installed distributions' metadata (so every entry knows its
distribution and version); loading goes through stevedore. When several
distributions provide one name in a group, the host chooses which serves it
(``select``, the ``MIG_PLUGIN_SELECT`` variable or the config file); without a
choice the first distribution in name order wins. ``MIG_DISABLED_PLUGINS`` and
the config file hide plugins by name. A plugin that fails to import is
reported and skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import stevedore
import structlog
from stevedore.exception import NoMatches

from mig_core.errors import PluginNotFound

log = structlog.get_logger("mig.plugins")


GROUPS = (
    "mig_core.transports",
    "mig_core.compressors",
    "mig_core.snapshot_backends",
    "mig_core.dirty_trackers",
    "mig_core.replication",
    "mig_core.hooks",
)


@dataclass(frozen=True)
class PluginEntry:
    group: str
    name: str
    value: str
    distribution: str
    version: str


def _short(group: str) -> str:
    return group.removeprefix("mig_core.")


_PREFIX = "mig_core."


def _full(group: str) -> str:
    return group if group.startswith(_PREFIX) else f"{_PREFIX}{group}"


def _parse_select(text: str) -> dict[tuple[str, str], str]:
    """``group:name=distribution`` items separated by commas or semicolons."""
    out = {}
    for item in filter(None, (s.strip() for s in text.replace(";", ",").split(","))):
        key, _, dist = item.partition("=")
        group, _, name = key.partition(":")
        if not dist or not name:
            raise ValueError(f"MIG_PLUGIN_SELECT item {item!r} is not group:name=distribution")
        out[(_full(group.strip()), name.strip())] = dist.strip()
    return out


def _parse_disabled(text: str) -> set[str]:
    return {s.strip() for s in text.replace(";", ",").split(",") if s.strip()}


def config_path() -> Path:
    if "MIG_CONFIG" in os.environ:
        return Path(os.environ["MIG_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "mig" / "plugins.toml"


@dataclass
class PluginRegistry:
    """The installed plugins of every group, with the host's selections and disabled names."""

    selected: dict[tuple[str, str], str] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    load_errors: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _loaded: dict[tuple[str, str], Any] = field(default_factory=dict)
    #: every mig_core.* group's entry points, read once (``entries``)
    _all: dict[str, list[PluginEntry]] | None = None

    @classmethod
    def from_environment(cls) -> PluginRegistry:
        """Selections and disabled names from the config file, then the environment (which wins)."""
        reg = cls()
        path = config_path()
        if path.is_file():
            data = tomllib.loads(path.read_text())
            for key, dist in data.get("select", {}).items():
                group, _, name = key.partition(":")
                reg.selected[(_full(group), name)] = dist
            reg.disabled |= set(data.get("disable", []))
        reg.selected.update(_parse_select(os.environ.get("MIG_PLUGIN_SELECT", "")))
        reg.disabled |= _parse_disabled(os.environ.get("MIG_DISABLED_PLUGINS", ""))
        return reg

    # -- listing ---------------------------------------------------------------

    def entries(self, group: str) -> list[PluginEntry]:
        """Every entry point of a group, deduplicated, in a deterministic order.

        The first call reads every distribution's entry points, for all groups at once (each read opens
        every installed distribution's metadata: 10-30 ms in a full environment, which a group first
        used at migrate time, such as a compressor, would otherwise add to the migration)."""
        group = _full(group)
        if self._all is None:
            self._all = self._scan()
        return self._all.get(group, [])

    def _scan(self) -> dict[str, list[PluginEntry]]:
        found: dict[str, dict[tuple[str, str, str], PluginEntry]] = {}
        for dist in md.distributions():
            dname = dist.metadata["Name"]
            for ep in dist.entry_points:
                if ep.group.startswith(_PREFIX):
                    found.setdefault(ep.group, {}).setdefault(
                        (ep.name, ep.value, dname), PluginEntry(ep.group, ep.name, ep.value, dname, dist.version))
        # stevedore keeps the entry points it saw first per group for the life of the process: drop
        # them, so what this scan found (a distribution installed or put on sys.path since) also loads
        cache = getattr(stevedore.ExtensionManager, "ENTRY_POINT_CACHE", None)
        if cache is not None:
            for group in found:
                cache.pop(group, None)
        return {g: sorted(e.values(), key=lambda e: (e.name, e.distribution.lower(), e.value))
                for g, e in found.items()}

    def rescan(self) -> None:
        """Forget what was found and loaded (after installing or removing distributions)."""
        self._all = None
        self._loaded.clear()

    def is_disabled(self, entry: PluginEntry) -> bool:
        return bool({entry.name, f"{_short(entry.group)}:{entry.name}", entry.distribution} & self.disabled)

    def choice(self, group: str, name: str) -> PluginEntry | None:
        """The entry that serves ``name`` in ``group``: the selected one, else the first in order."""
        group = _full(group)
        candidates = [e for e in self.entries(group) if e.name == name and not self.is_disabled(e)]
        if not candidates:
            return None
        wanted = self.selected.get((group, name))
        if wanted is not None:
            for e in candidates:
                if e.distribution == wanted:
                    return e
            log.warning("plugin_selection_missing", group=group, name=name, distribution=wanted)
        if len(candidates) > 1:
            log.info("plugin_name_conflict", group=group, name=name,
                     candidates=[e.distribution for e in candidates], chosen=candidates[0].distribution)
        return candidates[0]

    def names(self, group: str) -> list[str]:
        """Names with an enabled implementation in ``group``."""
        return sorted({e.name for e in self.entries(group) if not self.is_disabled(e)})

    # -- selection API -----------------------------------------------------------

    def select(self, group: str, name: str, distribution: str) -> None:
        """Choose which distribution serves ``name`` in ``group``."""
        self.selected[(_full(group), name)] = distribution
        self._loaded.pop((_full(group), name), None)

    def disable(self, name: str) -> None:
        """Hide a plugin by name, ``group:name`` or distribution."""
        self.disabled.add(name)
        self._loaded.clear()

    # -- loading -------------------------------------------------------------

    def load(self, group: str, name: str) -> Any:
        """Import and return the object behind the chosen entry point for ``name``."""
        group = _full(group)
        key = (group, name)
        if key in self._loaded:
            return self._loaded[key]
        entry = self.choice(group, name)
        if entry is None:
            installed = ", ".join(self.names(group)) or "nothing"
            raise PluginNotFound(f"no plugin named '{name}' in group {group} (installed: {installed})")
        failures: list[str] = []

        def on_failure(_mgr: Any, ep: md.EntryPoint, err: BaseException) -> None:
            if ep.value == entry.value:
                failures.append(f"{type(err).__name__}: {err}")
            self.load_errors[(group, ep.name, ep.value)] = f"{type(err).__name__}: {err}"
            log.error("plugin_load_failed", group=group, name=ep.name, target=ep.value, error=str(err))

        def resolve(_ns: str, _name: str, exts: list[Any]) -> Any:
            for ext in exts:
                if ext.entry_point.value == entry.value:
                    return ext
            raise NoMatches(f"{entry.value} did not load")

        try:
            mgr = stevedore.DriverManager(group, name, invoke_on_load=False, on_load_failure_callback=on_failure,
                                          conflict_resolver=resolve,
                                          on_missing_entrypoints_callback=lambda _names: None)
            obj = mgr.driver
        except NoMatches:
            obj = None
        if obj is None or failures:
            why = failures[0] if failures else "it did not load"
            raise PluginNotFound(f"plugin '{name}' in group {group} from {entry.distribution} failed to load: {why}")
        self._loaded[key] = obj
        return obj

    def load_class(self, group: str, name: str, base: type) -> Any:
        """The class serving ``name`` in ``group``, checked to subclass ``base``; logs which implementation
        and which distribution serve it. Every extension point's ``load`` goes through here, so a missing
        or wrong plugin is always one ``PluginNotFound`` naming the group and the name."""
        cls = self.load(group, name)
        entry = self.choice(group, name)
        dist = entry.distribution if entry else None
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginNotFound(f"plugin '{name}' in group {_full(group)} from {dist} is not a {base.__name__} "
                                 f"(it is {cls!r})")
        log.info("extension_selected", group=_full(group), name=name,
                 implementation=f"{cls.__module__}:{cls.__qualname__}", distribution=dist)
        return cls

    def load_all(self, group: str) -> dict[str, Any]:
        """Load the chosen implementation of every name in ``group``; failures are logged and skipped."""
        out = {}
        for name in self.names(group):
            try:
                out[name] = self.load(group, name)
            except PluginNotFound as e:
                log.error("plugin_skipped", group=group, name=name, error=str(e))
        return out

    def check_loadable(self, entry: PluginEntry) -> str | None:
        """Import one entry point by itself; the error text if it fails, else None."""
        ep = md.EntryPoint(entry.name, entry.value, entry.group)
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure is reported, never raised
            return f"{type(err).__name__}: {err}"
        return None
