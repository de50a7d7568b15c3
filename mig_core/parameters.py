"""The 28 migration parameters, each declared once: type, default, range, error text, docs.

The QMP structs ``MigrateSetParameters`` (input, tls-* accept null) and
``MigrationParameters`` (output) are built from these declarations, and so are
the checks of ``migrate-set-parameters`` and the generated reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from mig_core.compressor import GROUP as COMPRESSORS
from mig_core.errors import QMPError
from mig_core.plugin_registry import PluginNotFound, PluginRegistry
from mig_core.qapi import UNSET, Bool, Size, Str, StrOrNull, UInt8, UInt32, UInt64, UnsetType, Unstable
from mig_core.schema.migration import BitmapMigrationNodeAlias, MigMode, ZeroPageDetection
from mig_core.schema.migration import MigrationCapability as C

#: mig's target page size: the unit of xbzrle cache sizing and of page statistics.
TARGET_PAGE_SIZE = 4096
SIZE_MAX = (1 << 64) - 1

#: QEMU's compression methods and the first-party plugin that provides each.
QEMU_COMPRESSORS: dict[str, str | None] = {
    "none": None,
    "zlib": "mig-compress-zlib",
    "zstd": "mig-compress-zstd",
    "qpl": "mig-compress-qpl",
    "uadk": "mig-compress-uadk",
}


@dataclass(frozen=True)
class Range:
    lo: int
    hi: int
    error: str  # QEMU's text when a value falls outside [lo, hi]


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter. ``type`` is its QAPI annotation in query output; ``nullable`` adds null on input."""

    name: str
    type: Any
    default: Any
    doc: str
    range: Range | None = None
    nullable: bool = False
    unstable: bool = False
    unit: str = ""
    #: Extra validity rule in prose, for the reference (when a plain range does not say it all).
    rule: str = ""

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def qapi_type(self) -> str:
        return _type_name(self.type, self.nullable)


def _type_name(tp: Any, nullable: bool) -> str:
    if nullable:
        return "StrOrNull"
    if getattr(tp, "__origin__", None) is list:
        return "[" + tp.__args__[0].__name__ + "]"
    if hasattr(tp, "__metadata__"):
        return tp.__metadata__[0].extra["qapi"]
    return tp.__name__


def _between(name: str, lo: int, hi: int) -> Range:
    return Range(lo, hi, f"Parameter '{name}' expects a value between {lo} and {hi}")


def _integer_range(name: str, lo: int, hi: int | str, suffix: str = "") -> Range:
    hi_val = hi if isinstance(hi, int) else SIZE_MAX
    text = f"Parameter '{name}' expects an integer in the range of {lo} to {hi}{suffix}"
    return Range(lo, hi_val, text)


P = ParameterSpec
PARAMETERS: tuple[ParameterSpec, ...] = (
    P("announce-initial", Size, 50, "Delay before the first announce round after switchover.",
      _between("announce_initial", 0, 100000), unit="ms"),
    P("announce-max", Size, 550, "Longest delay between announce rounds.", _between("announce_max", 0, 100000),
      unit="ms"),
    P("announce-rounds", Size, 5, "How many announce rounds run on the destination (0: none).",
      _between("announce_rounds", 0, 1000)),
    P("announce-step", Size, 100, "Growth of the delay between announce rounds.",
      Range(1, 10000, "Parameter 'announce_step' expects a value between 0 and 10000"), unit="ms"),
    P("throttle-trigger-threshold", UInt8, 50,
      "Throttling starts when bytes dirtied in a period exceed this share of bytes sent.",
      _integer_range("throttle_trigger_threshold", 1, 100), unit="%"),
    P("cpu-throttle-initial", UInt8, 20, "First auto-converge throttle step.",
      _integer_range("cpu_throttle_initial", 1, 99), unit="%"),
    P("cpu-throttle-increment", UInt8, 10, "Auto-converge throttle increase per step.",
      _integer_range("cpu_throttle_increment", 1, 99), unit="%"),
    P("cpu-throttle-tailslow", Bool, False, "Near the end, raise the throttle only as much as the dirty rate needs."),
    P("tls-creds", Str, "", "Id of TLS credentials; non-empty turns TLS on (null resets to empty).", nullable=True),
    P("tls-hostname", Str, "", "Hostname to check the destination's certificate against.", nullable=True),
    P("tls-authz", Str, "", "Id of an authorization object checking the client certificate.", nullable=True),
    P("max-bandwidth", Size, 134217728, "Rate limit of the precopy stream (0: unlimited).",
      _integer_range("max_bandwidth", 0, "(18446744073709551615UL)", " bytes/second"), unit="bytes/s"),
    P("avail-switchover-bandwidth", Size, 0,
      "Bandwidth assumed for the switchover estimate (0: use the measured bandwidth).",
      _integer_range("avail_switchover_bandwidth", 0, "(18446744073709551615UL)", " bytes/second"), unit="bytes/s"),
    P("downtime-limit", UInt64, 300, "Longest acceptable downtime; switchover waits until the rest fits.",
      Range(0, 2000000, "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
      unit="ms"),
    P("x-checkpoint-delay", UInt32, 20000, "COLO checkpoint period.", unstable=True, unit="ms"),
    P("multifd-channels", UInt8, 2, "Number of parallel multifd channels.", _between("multifd_channels", 1, 255)),
    P("xbzrle-cache-size", Size, 67108864, "Size of the xbzrle page cache.",
      Range(TARGET_PAGE_SIZE, SIZE_MAX,
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
      unit="bytes", rule="a power of two, at least the target page size (4096)"),
    P("max-postcopy-bandwidth", Size, 0, "Rate limit of background pages during postcopy (0: unlimited).",
      unit="bytes/s"),
    P("max-cpu-throttle", UInt8, 99, "Highest auto-converge throttle.",
      Range(0, 99, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
      unit="%", rule="from cpu-throttle-initial to 99 (checked on the merged values)"),
    P("multifd-compression", Str, "none",
      "Compression of multifd pages: QEMU's names (none, zlib, zstd, qpl, uadk) or a name an installed "
      "compressor plugin registers.",
      rule="a QEMU name whose plugin is not installed is refused, naming the plugin to install"),
    P("multifd-zlib-level", UInt8, 1, "zlib level for multifd compression.", _between("multifd_zlib_level", 0, 9)),
    P("multifd-zstd-level", UInt8, 1, "zstd level for multifd compression.", _between("multifd_zstd_level", 0, 20)),
    P("block-bitmap-mapping", list[BitmapMigrationNodeAlias], UNSET,
      "Which block dirty bitmaps migrate under which aliases (reported once set)."),
    P("x-vcpu-dirty-limit-period", UInt64, 1000, "Period of the dirty-limit controller.",
      _between("x-vcpu-dirty-limit-period", 1, 1000), unstable=True, unit="ms"),
    P("vcpu-dirty-limit", UInt64, 1, "Dirty rate each vCPU is held to under the dirty-limit capability.",
      Range(1, SIZE_MAX, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"), unit="MB/s"),
    P("mode", MigMode, MigMode.NORMAL, "Migration mode."),
    P("zero-page-detection", ZeroPageDetection, ZeroPageDetection.MULTIFD,
      "Where zero pages are detected: nowhere, in the main thread (legacy) or in multifd threads."),
    P("direct-io", Bool, False, "Open the migration file with O_DIRECT (mapped-ram with multifd)."),
)

SPECS: dict[str, ParameterSpec] = {p.name: p for p in PARAMETERS}


def _struct(name: str, for_input: bool) -> type[msgspec.Struct]:
    from mig_core.qapi.model import QapiStruct

    fields = []
    for p in PARAMETERS:
        tp = StrOrNull if (for_input and p.nullable) else p.type
        if p.unstable:
            tp = Annotated[tp, Unstable]
        fields.append((p.attr, tp | UnsetType, UNSET))
    return msgspec.defstruct(name, fields, bases=(QapiStruct,), module=__name__, kw_only=True)


#: Arguments of ``migrate-set-parameters``: every member optional; tls-* accept null.
MigrateSetParameters = _struct("MigrateSetParameters", for_input=True)
#: Reply of ``query-migrate-parameters``.
MigrationParameters = _struct("MigrationParameters", for_input=False)


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
)
"""QEMU's order (migrate_params_check); the first failure wins."""


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMETERS}


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


def to_struct(values: Mapping[str, Any]) -> msgspec.Struct:
    """The query-migrate-parameters reply for a set of values."""
    return MigrationParameters(**{SPECS[k].attr: v for k, v in values.items()})


@dataclass
class ParameterStore:
    """The live parameter values of one machine, replaced all at once on a valid set."""

    values: dict[str, Any] = field(default_factory=defaults)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]
