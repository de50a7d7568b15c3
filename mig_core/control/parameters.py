"""The checks of ``migrate-set-parameters`` (QEMU's order and texts) and the live parameter store.

The parameters themselves are declared in ``mig_core.schema.parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from mig_core.errors import QMPError
from mig_core.ext.compressor import GROUP as COMPRESSORS
from mig_core.plugin.registry import PluginNotFound, PluginRegistry
from mig_core.qapi import UNSET
from mig_core.schema.migration import BitmapMigrationNodeAlias
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.parameters import PARAMETERS, SPECS, defaults

#: QEMU's compression methods and the first-party plugin that provides each.
QEMU_COMPRESSORS: dict[str, str | None] = {
    "none": None,
    "zlib": "mig-compress-zlib",
    "zstd": "mig-compress-zstd",
    "qpl": "mig-compress-qpl",
    "uadk": "mig-compress-uadk",
}


# ---------------------------------------------------------------------------
# validation of the merged set (QEMU's migrate_params_check order)


@dataclass
class CheckContext:
    """What parameter checks need besides the values: capabilities and the installed plugins."""

    caps: Mapping[C, bool]
    registry: PluginRegistry
    direct_io_supported: bool = True


_NODE_NAME_MAX = 31
_BITMAP_NAME_MAX = 1023
_ALIAS_MAX = 255
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


def _check_bitmap_mapping(mapping: list[BitmapMigrationNodeAlias]) -> str | None:
    prefix = "Invalid mapping given for block-bitmap-mapping: "
    node_names: set[str] = set()
    node_aliases: set[str] = set()
    for node in mapping:
        if not _ID_RE.match(node.alias):
            return prefix + f"The node alias '{node.alias}' is not well-formed"
        if len(node.alias.encode()) > _ALIAS_MAX:
            return prefix + f"The node alias '{node.alias}' is longer than 255 bytes"
        if len(node.node_name.encode()) > _NODE_NAME_MAX:
            return prefix + f"The node name '{node.node_name}' is longer than {_NODE_NAME_MAX} bytes"
        if node.node_name in node_names:
            return prefix + f"The node name '{node.node_name}' is mapped twice"
        if node.alias in node_aliases:
            return prefix + f"The node alias '{node.alias}' is used twice"
        node_names.add(node.node_name)
        node_aliases.add(node.alias)
        bitmap_names: set[str] = set()
        bitmap_aliases: set[str] = set()
        for bm in node.bitmaps:
            if len(bm.alias.encode()) > _ALIAS_MAX:
                return prefix + f"The bitmap alias '{bm.alias}' is longer than 255 bytes"
            if len(bm.name.encode()) > _BITMAP_NAME_MAX:
                return prefix + f"The bitmap name '{bm.name}' is longer than {_BITMAP_NAME_MAX} bytes"
            if bm.name in bitmap_names:
                return prefix + f"The bitmap '{node.node_name}'/'{bm.name}' is mapped twice"
            if bm.alias in bitmap_aliases:
                return prefix + f"The bitmap alias '{node.alias}'/'{bm.alias}' is used twice"
            bitmap_names.add(bm.name)
            bitmap_aliases.add(bm.alias)
    return None


def _range(name: str) -> Callable[[dict[str, Any], dict[str, Any], CheckContext], str | None]:
    spec = SPECS[name]
    assert spec.range is not None

    def check(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
        v = new[name]
        assert spec.range is not None
        return None if spec.range.lo <= v <= spec.range.hi else spec.range.error

    return check


def _xbzrle_cache_size(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    v = new["xbzrle-cache-size"]
    spec = SPECS["xbzrle-cache-size"].range
    assert spec is not None
    return spec.error if v < spec.lo or v & (v - 1) else None


def _max_cpu_throttle(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    if not new["cpu-throttle-initial"] <= new["max-cpu-throttle"] <= 99:
        return SPECS["max-cpu-throttle"].range.error  # type: ignore[union-attr]
    return None


def _bitmap_mapping(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    mapping = new["block-bitmap-mapping"]
    return None if mapping is UNSET else _check_bitmap_mapping(mapping)


def _zero_copy(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    if ctx.caps.get(C.ZERO_COPY_SEND) and (new["multifd-compression"] != "none" or new["tls-creds"]):
        return "Zero copy only available for non-compressed non-TLS multifd migration"
    return None


def _mapped_ram(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    # QEMU tests the values from before this call (a quirk that lets the first bad change through and
    # then refuses every later call, the repair included); mig checks the merged values, like zero-copy.
    if ctx.caps.get(C.MAPPED_RAM) and (new["multifd-compression"] != "none" or new["tls-creds"]):
        return "Mapped-ram only available for non-compressed non-TLS multifd migration"
    return None


def _direct_io(new: dict[str, Any], old: dict[str, Any], ctx: CheckContext) -> str | None:
    if new["direct-io"] and not ctx.direct_io_supported:
        return "No build-time support for direct-io"
    return None


CHECKS = (
    _range("throttle-trigger-threshold"), _range("cpu-throttle-initial"), _range("cpu-throttle-increment"),
    _range("max-bandwidth"), _range("avail-switchover-bandwidth"), _range("downtime-limit"),
    _range("multifd-channels"), _range("multifd-zlib-level"), _range("multifd-zstd-level"),
    _xbzrle_cache_size, _max_cpu_throttle, _range("announce-initial"), _range("announce-max"),
    _range("announce-rounds"), _range("announce-step"), _bitmap_mapping, _zero_copy, _mapped_ram,
    _range("x-vcpu-dirty-limit-period"), _range("vcpu-dirty-limit"), _direct_io,
    _range("x-colo-heartbeat-timeout"), _range("x-colo-compare-limit"),  # mig's own, after QEMU's
)
"""QEMU's order (migrate_params_check); the first failure wins."""


def check_compression(name: str, ctx: CheckContext) -> None:
    """Refuse a compression method no installed plugin provides (naming the plugin) or that fails to load."""
    group = COMPRESSORS
    try:
        ctx.registry.load(group, name)
        return
    except PluginNotFound as e:
        if name in ctx.registry.names(group):
            raise QMPError(f"Compression method '{name}' is installed but cannot be used: {e}") from None
    plugin = QEMU_COMPRESSORS.get(name)
    if plugin:
        raise QMPError(
            f"Compression method '{name}' is not available: install the {plugin} plugin "
            f"(pip install {plugin})"
        )
    raise QMPError(f"Parameter 'multifd-compression' does not accept value '{name}'")


def merge(current: dict[str, Any], request: msgspec.Struct, ctx: CheckContext) -> dict[str, Any]:
    """Validate ``request`` overlaid on ``current``; return the new values or raise QMPError."""
    new = dict(current)
    for p in PARAMETERS:
        v = getattr(request, p.attr)
        if v is UNSET:
            continue
        if p.nullable and v is None:
            v = ""
        new[p.name] = v
    if request.multifd_compression is not UNSET:  # type: ignore[attr-defined]
        check_compression(new["multifd-compression"], ctx)
    for chk in CHECKS:
        err = chk(new, current, ctx)
        if err:
            raise QMPError(err)
    return new


@dataclass
class ParameterStore:
    """The live parameter values of one machine, replaced all at once on a valid set."""

    values: dict[str, Any] = field(default_factory=defaults)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]
