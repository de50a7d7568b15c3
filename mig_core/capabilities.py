"""The 22 migration capabilities and QEMU's set-time rules, declared once.

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
    CapabilitySpec(C.ZERO_BLOCKS, "Deprecated and without effect (block migration no longer exists)."),
    CapabilitySpec(C.EVENTS, "Emit MIGRATION and MIGRATION_PASS events on this side."),
    CapabilitySpec(C.POSTCOPY_RAM, "Allow switching to postcopy: run on the destination, fetch missing pages on fault."),
    CapabilitySpec(C.X_COLO, "COLO fault tolerance: keep a secondary in lock-step by periodic checkpoints.", True),
    CapabilitySpec(C.RELEASE_RAM, "During postcopy, free source RAM as soon as it has been sent."),
    CapabilitySpec(C.RETURN_PATH, "Open a destination-to-source channel; the source completes only after the "
                                  "destination confirms it loaded everything."),
    CapabilitySpec(C.PAUSE_BEFORE_SWITCHOVER, "Stop in pre-switchover (machine stopped) until migrate-continue."),
    CapabilitySpec(C.MULTIFD, "Send pages over multifd-channels parallel connections."),
    CapabilitySpec(C.DIRTY_BITMAPS, "Migrate block dirty bitmaps (accepted; mig has no block layer)."),
    CapabilitySpec(C.POSTCOPY_BLOCKTIME, "On the destination, measure how long vCPUs wait for postcopy pages."),
    CapabilitySpec(C.LATE_BLOCK_ACTIVATE, "Historic: defer block activation until cont (no effect)."),
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
)

assert [s.cap for s in CAPABILITIES] == list(C), "capability table must follow the schema's enum order"


class CapabilityContext(Protocol):
    """What the rules need to know about the host and the machine."""

    runstate: RunState

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

    def per_vcpu_dirty_available(self) -> bool:
        """True if the dirty tracker (or the host) attributes writes to vCPUs."""


Rule = Callable[[dict[C, bool], dict[C, bool], CapabilityContext], str | None]

#: Checked in this order when background-snapshot is on (QEMU's list).
BACKGROUND_SNAPSHOT_INCOMPATIBLE = (
    C.POSTCOPY_RAM, C.DIRTY_BITMAPS, C.POSTCOPY_BLOCKTIME, C.LATE_BLOCK_ACTIVATE, C.RETURN_PATH, C.MULTIFD,
    C.PAUSE_BEFORE_SWITCHOVER, C.AUTO_CONVERGE, C.RELEASE_RAM, C.RDMA_PIN_ALL, C.XBZRLE, C.X_COLO,
    C.VALIDATE_UUID, C.ZERO_COPY_SEND,
)

ZERO_COPY_TEXT = "Zero copy only available for non-compressed non-TLS multifd migration"


def _colo(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.X_COLO] and not ctx.replication_available():
        log.warning("colo_unavailable", hint="install the mig-replication-colo plugin")
        return "QEMU compiled without replication module can't enable COLO"
    return None


def _postcopy(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if not new[C.POSTCOPY_RAM]:
        return None
    if not old[C.POSTCOPY_RAM] and ctx.runstate is RunState.INMIGRATE:
        reason = ctx.postcopy_unsupported()
        if reason:
            return f"Postcopy is not supported: {reason}"
    if new[C.X_IGNORE_SHARED]:
        return "Postcopy is not compatible with ignore-shared"
    return None


def _background_snapshot(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if not new[C.BACKGROUND_SNAPSHOT]:
        return None
    if ctx.background_snapshot_unsupported():
        return "Background-snapshot is not supported by host kernel"
    if ctx.memory_unsuitable_for_background_snapshot():
        return "Background-snapshot is not compatible with guest memory configuration"
    for cap in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
        if new[cap]:
            return f"Background-snapshot is not compatible with {cap.value}"
    return None


def _zero_copy(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.ZERO_COPY_SEND] and (
        not new[C.MULTIFD] or new[C.XBZRLE] or ctx.multifd_compression() != "none" or ctx.tls_enabled()
    ):
        return ZERO_COPY_TEXT
    return None


def _preempt(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.POSTCOPY_PREEMPT]:
        if not new[C.POSTCOPY_RAM]:
            return "Postcopy preempt requires postcopy-ram"
        if not old[C.POSTCOPY_PREEMPT] and ctx.incoming_started():
            return "Postcopy preempt must be set before incoming starts"
    return None


def _multifd_incoming(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.MULTIFD] and not old[C.MULTIFD] and ctx.incoming_started():
        return "Multifd must be set before incoming starts"
    return None


def _switchover_ack(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.SWITCHOVER_ACK] and not new[C.RETURN_PATH]:
        return "Capability 'switchover-ack' requires capability 'return-path'"
    return None


def _dirty_limit(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.DIRTY_LIMIT]:
        if new[C.AUTO_CONVERGE]:
            return "dirty-limit conflicts with auto-converge either of then available currently"
        if not ctx.per_vcpu_dirty_available():
            # QEMU needs a KVM dirty ring; mig needs writes attributed to vCPUs.
            return ("dirty-limit requires per-vCPU dirty page attribution "
                    "(the 'host' dirty tracker or vCPU threads that report their writes)")
    return None


def _multifd_xbzrle(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.MULTIFD] and new[C.XBZRLE]:
        return "Multifd is not compatible with xbzrle"
    return None


def _mapped_ram(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if new[C.MAPPED_RAM]:
        if new[C.XBZRLE]:
            return "Mapped-ram migration is incompatible with xbzrle"
        if new[C.POSTCOPY_RAM]:
            return "Mapped-ram migration is incompatible with postcopy"
    return None


def _rdma(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> str | None:
    if ctx.incoming_rdma():
        if new[C.XBZRLE]:
            return "RDMA and XBZRLE can't be used together"
        if new[C.MULTIFD]:
            return "RDMA and multifd can't be used together"
        if new[C.POSTCOPY_RAM]:
            return "RDMA and postcopy-ram can't be used together"
    return None


#: QEMU's order: the first rule that fails decides the error.
RULES: tuple[Rule, ...] = (
    _colo, _postcopy, _background_snapshot, _zero_copy, _preempt, _multifd_incoming, _switchover_ack,
    _dirty_limit, _multifd_xbzrle, _mapped_ram, _rdma,
)


def defaults() -> dict[C, bool]:
    return {s.cap: s.default for s in CAPABILITIES}


def check(new: dict[C, bool], old: dict[C, bool], ctx: CapabilityContext) -> None:
    """Raise QMPError with QEMU's text if the capability set ``new`` is not allowed."""
    if new[C.ZERO_BLOCKS]:
        log.warning("zero_blocks_deprecated", msg="zero-blocks capability is deprecated")
    for rule in RULES:
        err = rule(new, old, ctx)
        if err:
            raise QMPError(err)


def overlay(current: dict[C, bool], request: Iterable[MigrationCapabilityStatus]) -> dict[C, bool]:
    """The capability set after applying a request; later entries win."""
    new = dict(current)
    for item in request:
        new[item.capability] = item.state
    return new
