"""The 22 migration capabilities of QEMU's schema, mig's x-checksums, and QEMU's set-time rules, declared once.

``migrate-set-capabilities`` overlays the request on the current set and runs
the rules below in QEMU's order on the result; the first failure is returned
with QEMU's text and nothing changes. Disabling a capability is never refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from mig_core.errors import QMPError
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationCapabilityStatus

log = structlog.get_logger("mig.capabilities")


@dataclass(frozen=True)
class CapabilitySpec:
    """One capability: its name, whether it is unstable, and what it does."""

    cap: C
    doc: str
    unstable: bool = False
    default: bool = False


CAPABILITIES: tuple[CapabilitySpec, ...] = (
    CapabilitySpec(C.XBZRLE, "Delta-encode pages sent again against a cache of their previous contents."),
    CapabilitySpec(C.RDMA_PIN_ALL, "Register (pin) all RAM with the rdma transport up front instead of on demand."),
    CapabilitySpec(C.AUTO_CONVERGE, "Throttle vCPU threads when the program dirties memory faster than it is sent."),
    CapabilitySpec(C.ZERO_BLOCKS, "Block data migration (a node added with migrate): zero blocks go as markers."),
    CapabilitySpec(C.EVENTS, "Emit MIGRATION and MIGRATION_PASS events on this side."),
    CapabilitySpec(C.POSTCOPY_RAM,
                   "Allow switching to postcopy: run on the destination, fetch missing pages on fault."),
    CapabilitySpec(C.X_COLO, "COLO fault tolerance: keep a secondary in lock-step by periodic checkpoints.", True),
    CapabilitySpec(C.RELEASE_RAM, "During postcopy, free source RAM as soon as it has been sent."),
    CapabilitySpec(C.RETURN_PATH, "Open a destination-to-source channel; the source completes only after the "
                                  "destination confirms it loaded everything."),
    CapabilitySpec(C.PAUSE_BEFORE_SWITCHOVER, "Stop in pre-switchover (machine stopped) until migrate-continue."),
    CapabilitySpec(C.MULTIFD, "Send pages over multifd-channels parallel connections."),
    CapabilitySpec(C.DIRTY_BITMAPS, "Migrate block nodes' named dirty bitmaps (block-bitmap-mapping renames them)."),
    CapabilitySpec(C.POSTCOPY_BLOCKTIME, "On the destination, measure how long vCPUs wait for postcopy pages."),
    CapabilitySpec(C.LATE_BLOCK_ACTIVATE, "A destination that stays paused takes its block nodes' locks at cont."),
    CapabilitySpec(C.X_IGNORE_SHARED, "Do not send RAM blocks that are shared and file-backed; both ends map them.",
                   True),
    CapabilitySpec(C.VALIDATE_UUID, "Send the source uuid; the destination refuses a stream from another uuid."),
    CapabilitySpec(C.BACKGROUND_SNAPSHOT, "Write a point-in-time snapshot while the program keeps running "
                                          "(userfaultfd write-protect)."),
    CapabilitySpec(C.ZERO_COPY_SEND, "Send multifd pages with MSG_ZEROCOPY."),
    CapabilitySpec(C.POSTCOPY_PREEMPT, "Serve postcopy page requests on a separate channel."),
    CapabilitySpec(C.SWITCHOVER_ACK, "Switch over only after the destination acknowledges it is ready."),
    CapabilitySpec(C.DIRTY_LIMIT, "Throttle each vCPU to vcpu-dirty-limit MB/s by its own dirty rate."),
    CapabilitySpec(C.MAPPED_RAM, "Give each RAM page a fixed offset in a file: parallel writes, no scan on load."),
    CapabilitySpec(C.X_CHECKSUMS, "mig's own: every section, packet and page carries an xxh3-64 of its bytes, "
                                  "so a bit flipped on the way fails the migration (set on both sides).", True),
)

assert [s.cap for s in CAPABILITIES] == list(C), "capability table must follow the schema's enum order"


class CapabilityContext(Protocol):
    """What the rules need to know about the host and the machine."""

    @property
    def runstate(self) -> RunState: ...

    def incoming_started(self) -> bool:
        """True once a destination listener exists (exec/fd incoming do not count)."""

    def incoming_rdma(self) -> bool:
        """True if this process is listening for an rdma incoming migration."""

    def multifd_compression(self) -> str: ...

    def tls_enabled(self) -> bool: ...

    def postcopy_unsupported(self) -> str | None:
        """Why this host cannot serve postcopy (None when it can)."""

    def background_snapshot_unsupported(self) -> str | None:
        """Why this host cannot write-protect guest memory (None when it can)."""

    def memory_unsuitable_for_background_snapshot(self) -> bool: ...

    def replication_available(self) -> bool: ...

    def per_vcpu_dirty_hint(self) -> str:
        """How this host gets per-vCPU dirty attribution, for the refusal's text ("" if nothing to add)."""

    def per_vcpu_dirty_available(self) -> bool:
        """True if the dirty tracker (or the host) attributes writes to vCPUs."""


Caps = dict[C, bool]


@dataclass(frozen=True)
class Rule:
    """One set-time check: when ``applies(new, old, ctx)`` the request fails with ``error``.

    ``error`` is QEMU's text, or a callable building it when it depends on the host.
    """

    doc: str
    error: str | Callable[[CapabilityContext], str]
    applies: Callable[[Caps, Caps, CapabilityContext], bool]
    #: How the reference shows an error built at run time.
    shown: str = ""

    def message(self, ctx: CapabilityContext) -> str:
        return self.error if isinstance(self.error, str) else self.error(ctx)


#: Checked in this order when background-snapshot is on (QEMU's list).
BACKGROUND_SNAPSHOT_INCOMPATIBLE = (
    C.POSTCOPY_RAM, C.DIRTY_BITMAPS, C.POSTCOPY_BLOCKTIME, C.LATE_BLOCK_ACTIVATE, C.RETURN_PATH, C.MULTIFD,
    C.PAUSE_BEFORE_SWITCHOVER, C.AUTO_CONVERGE, C.RELEASE_RAM, C.RDMA_PIN_ALL, C.XBZRLE, C.X_COLO,
    C.VALIDATE_UUID, C.ZERO_COPY_SEND,
)

ZERO_COPY_TEXT = "Zero copy only available for non-compressed non-TLS multifd migration"


def _newly(cap: C) -> Callable[[Caps, Caps], bool]:
    return lambda new, old: new[cap] and not old[cap]


def _conflicts_with_background_snapshot(other: C) -> Callable[[Caps, Caps, CapabilityContext], bool]:
    return lambda new, old, ctx: new[C.BACKGROUND_SNAPSHOT] and new[other]


def _needs_attribution(ctx: CapabilityContext) -> str:
    hint = ctx.per_vcpu_dirty_hint()
    return ("dirty-limit requires per-vCPU dirty page attribution (the 'host' dirty tracker or vCPU threads "
            "that report their writes)" + (f"; {hint}" if hint else ""))


RULES: tuple[Rule, ...] = (
    Rule("x-colo needs a replication plugin (mig_core.replication: colo)",
         "QEMU compiled without replication module can't enable COLO",
         lambda new, old, ctx: new[C.X_COLO] and not ctx.replication_available()),
    Rule("postcopy-ram newly enabled on a destination (run state inmigrate) probes userfaultfd",
         lambda ctx: f"Postcopy is not supported: {ctx.postcopy_unsupported()}",
         lambda new, old, ctx: _newly(C.POSTCOPY_RAM)(new, old) and ctx.runstate is RunState.INMIGRATE
         and ctx.postcopy_unsupported() is not None,
         "Postcopy is not supported: <reason>"),
    Rule("postcopy-ram conflicts with x-ignore-shared", "Postcopy is not compatible with ignore-shared",
         lambda new, old, ctx: new[C.POSTCOPY_RAM] and new[C.X_IGNORE_SHARED]),
    Rule("background-snapshot needs userfaultfd write-protect",
         "Background-snapshot is not supported by host kernel",
         lambda new, old, ctx: new[C.BACKGROUND_SNAPSHOT] and ctx.background_snapshot_unsupported() is not None),
    Rule("background-snapshot needs RAM it can write-protect",
         "Background-snapshot is not compatible with guest memory configuration",
         lambda new, old, ctx: new[C.BACKGROUND_SNAPSHOT] and ctx.memory_unsuitable_for_background_snapshot()),
    *(
        Rule(f"background-snapshot conflicts with {other.value}",
             f"Background-snapshot is not compatible with {other.value}",
             _conflicts_with_background_snapshot(other))
        for other in BACKGROUND_SNAPSHOT_INCOMPATIBLE
    ),
    Rule("zero-copy-send needs multifd, no xbzrle, multifd-compression none and no TLS", ZERO_COPY_TEXT,
         lambda new, old, ctx: new[C.ZERO_COPY_SEND] and (
             not new[C.MULTIFD] or new[C.XBZRLE] or ctx.multifd_compression() != "none" or ctx.tls_enabled())),
    Rule("postcopy-preempt requires postcopy-ram", "Postcopy preempt requires postcopy-ram",
         lambda new, old, ctx: new[C.POSTCOPY_PREEMPT] and not new[C.POSTCOPY_RAM]),
    Rule("postcopy-preempt cannot be newly enabled once the destination listens",
         "Postcopy preempt must be set before incoming starts",
         lambda new, old, ctx: _newly(C.POSTCOPY_PREEMPT)(new, old) and ctx.incoming_started()),
    Rule("multifd cannot be newly enabled once the destination listens",
         "Multifd must be set before incoming starts",
         lambda new, old, ctx: _newly(C.MULTIFD)(new, old) and ctx.incoming_started()),
    Rule("switchover-ack requires return-path", "Capability 'switchover-ack' requires capability 'return-path'",
         lambda new, old, ctx: new[C.SWITCHOVER_ACK] and not new[C.RETURN_PATH]),
    Rule("dirty-limit conflicts with auto-converge",
         "dirty-limit conflicts with auto-converge either of then available currently",
         lambda new, old, ctx: new[C.DIRTY_LIMIT] and new[C.AUTO_CONVERGE]),
    # QEMU needs a KVM dirty ring here; mig needs writes attributed to vCPUs.
    Rule("dirty-limit needs per-vCPU dirty attribution", _needs_attribution,
         lambda new, old, ctx: new[C.DIRTY_LIMIT] and not ctx.per_vcpu_dirty_available(),
         "dirty-limit requires per-vCPU dirty page attribution (the 'host' dirty tracker or vCPU threads that "
         "report their writes)[; <how the host gets it>]"),
    Rule("multifd conflicts with xbzrle", "Multifd is not compatible with xbzrle",
         lambda new, old, ctx: new[C.MULTIFD] and new[C.XBZRLE]),
    Rule("mapped-ram conflicts with xbzrle", "Mapped-ram migration is incompatible with xbzrle",
         lambda new, old, ctx: new[C.MAPPED_RAM] and new[C.XBZRLE]),
    Rule("mapped-ram conflicts with postcopy-ram", "Mapped-ram migration is incompatible with postcopy",
         lambda new, old, ctx: new[C.MAPPED_RAM] and new[C.POSTCOPY_RAM]),
    Rule("x-checksums does not cover postcopy's page requests yet", "mig cannot combine x-checksums with "
         "postcopy-ram yet", lambda new, old, ctx: new[C.X_CHECKSUMS] and new[C.POSTCOPY_RAM]),
    Rule("x-checksums does not cover mapped-ram's file layout", "mig cannot combine x-checksums with "
         "mapped-ram yet", lambda new, old, ctx: new[C.X_CHECKSUMS] and new[C.MAPPED_RAM]),
    Rule("an rdma destination cannot use xbzrle", "RDMA and XBZRLE can't be used together",
         lambda new, old, ctx: ctx.incoming_rdma() and new[C.XBZRLE]),
    Rule("an rdma destination cannot use multifd", "RDMA and multifd can't be used together",
         lambda new, old, ctx: ctx.incoming_rdma() and new[C.MULTIFD]),
    Rule("an rdma destination cannot use postcopy-ram", "RDMA and postcopy-ram can't be used together",
         lambda new, old, ctx: ctx.incoming_rdma() and new[C.POSTCOPY_RAM]),
)
"""QEMU's order: the first rule that applies decides the error."""


def defaults() -> dict[C, bool]:
    return {s.cap: s.default for s in CAPABILITIES}


def check(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> None:
    """Raise QMPError with QEMU's text if the capability set ``new`` is not allowed."""
    if new[C.ZERO_BLOCKS]:
        log.warning("zero_blocks_deprecated", msg="zero-blocks capability is deprecated")
    if new[C.X_COLO] and not ctx.replication_available():
        log.warning("colo_unavailable", hint="install the mig-replication-colo plugin")
    for rule in RULES:
        if rule.applies(new, old, ctx):
            raise QMPError(rule.message(ctx))


def overlay(current: dict[C, bool], request: Iterable[MigrationCapabilityStatus]) -> dict[C, bool]:
    """The capability set after applying a request; later entries win."""
    new = dict(current)
    for item in request:
        new[item.capability] = item.state
    return new
