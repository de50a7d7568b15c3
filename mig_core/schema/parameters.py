"""The 28 migration parameters, each declared once: type, default, range, error text, docs.

The QMP structs ``MigrateSetParameters`` (input, tls-* accept null) and
``MigrationParameters`` (output) are built from these declarations, and so are
the checks of ``migrate-set-parameters`` (``mig_core.control.parameters``) and the generated reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from mig_core.qapi import UNSET, Bool, Size, Str, StrOrNull, UInt8, UInt32, UInt64, UnsetType, Unstable
from mig_core.schema.migration import BitmapMigrationNodeAlias, MigMode, ZeroPageDetection

#: mig's target page size: the unit of xbzrle cache sizing and of page statistics.
TARGET_PAGE_SIZE = 4096
SIZE_MAX = (1 << 64) - 1

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
    P("x-colo-heartbeat-timeout", UInt32, 800,
      "mig's own: COLO fails over on its own when the peer is silent this long or its connection breaks "
      "(0: only x-colo-lost-heartbeat does, as in QEMU).",
      _between("x-colo-heartbeat-timeout", 0, 60000), unstable=True, unit="ms"),
    P("x-colo-compare-limit", UInt32, 4096,
      "mig's own: messages the COLO primary may hold for comparison; a full queue forces a checkpoint.",
      _between("x-colo-compare-limit", 1, 1048576), unstable=True),
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


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMETERS}


def to_struct(values: Mapping[str, Any]) -> msgspec.Struct:
    """The query-migrate-parameters reply for a set of values."""
    return MigrationParameters(**{SPECS[k].attr: v for k, v in values.items()})
