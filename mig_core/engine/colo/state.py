"""COLO's state shared by the control plane and the COLO thread of either side: the failover status
(QEMU's FailoverStatus), the mode at the last failover, requests for a checkpoint, and the figures."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from mig_core.errors import QMPError
from mig_core.ext.replication import CompareStats
from mig_core.schema.migration import COLOExitReason, COLOMode, FailoverStatus

log = structlog.get_logger("mig.colo")

F = FailoverStatus

#: how often a side waiting for a failover decision looks at its other reasons to stop waiting
POLL_S = 0.05


@dataclass
class CheckpointFigures:
    """What the checkpoints of the current (or last) COLO run took (``x-query-colo-stats``)."""

    checkpoints: int = 0
    #: why each checkpoint came: periodic, mismatch, queue-full, request
    reasons: dict[str, int] = field(default_factory=dict)
    #: ms the primary was stopped for the last checkpoint (stop to running again)
    last_pause_ms: float = 0.0
    #: ms from that stop until the secondary had loaded it (its held output released then)
    last_loaded_ms: float = 0.0
    max_pause_ms: float = 0.0
    total_pause_ms: float = 0.0
    last_pages: int = 0
    last_vmstate_bytes: int = 0
    #: milliseconds from detecting the peer lost (or the failover request) to this side running alone
    failover_ms: float | None = None


class ColoState:
    """One host's COLO state: failover status, last mode, checkpoint requests, the running side's hooks."""

    def __init__(self, emit_exit: Callable[[COLOMode, COLOExitReason], None]) -> None:
        self._lock = threading.Lock()
        self._emit_exit = emit_exit
        self.failover = F.NONE
        self.last_mode = COLOMode.NONE
        #: the running side (set by the COLO thread while it runs): wakes it for a failover or a checkpoint
        self._kick: Callable[[], None] | None = None
        self._asked = threading.Event()  # a failover was asked for in this COLO run
        self._checkpoint_asked: Callable[[str], None] | None = None
        self.figures = CheckpointFigures()
        self.compare: Callable[[], CompareStats] = CompareStats
        #: the last COLO run compared output here (it was a primary)
        self.has_compare = False
        #: why the last COLO run on this host ended (none while it runs or before any)
        self.last_exit = COLOExitReason.NONE

    # -- the COLO thread's side ------------------------------------------------------------

    def begin(self, kick: Callable[[], None], ask_checkpoint: Callable[[str], None] | None,
              compare: Callable[[], CompareStats] | None = None) -> None:
        """A COLO run starts on this host (QEMU's failover_init_state)."""
        with self._lock:
            self.failover = F.NONE
            self._asked.clear()
            self._kick = kick
            self._checkpoint_asked = ask_checkpoint
            self.figures = CheckpointFigures()
            self.compare = compare or CompareStats
            self.has_compare = compare is not None
            self.last_exit = COLOExitReason.NONE

    def end(self) -> None:
        with self._lock:
            self._kick = None
            self._checkpoint_asked = None

    def cas(self, old: FailoverStatus, new: FailoverStatus) -> bool:
        with self._lock:
            if self.failover is not old:
                return False
            self.failover = new
        log.info("colo_failover_status", old=old.value, new=new.value)
        return True

    @property
    def requested(self) -> bool:
        """A failover was asked for (and not yet done)."""
        return self.failover in (F.REQUIRE, F.ACTIVE, F.RELAUNCH)

    def exited(self, mode: COLOMode) -> None:
        """The side left its COLO loop: COLO_EXIT with QEMU's reason (request if a failover was asked)."""
        reason = COLOExitReason.ERROR if self.failover is F.NONE else COLOExitReason.REQUEST
        self.last_exit = reason
        log.info("colo_exit", mode=mode.value, reason=reason.value)
        self._emit_exit(mode, reason)

    def failed_over(self, mode: COLOMode) -> None:
        with self._lock:
            self.last_mode = mode

    # -- the control plane's side ---------------------------------------------------------

    def lost_heartbeat(self, in_colo: bool, automatic: str | None = None) -> None:
        """x-colo-lost-heartbeat (or the heartbeat watchdog, ``automatic`` saying why): fail over now."""
        if not in_colo:
            raise QMPError("VM is not in COLO mode")
        if not self.cas(F.NONE, F.REQUIRE):
            raise QMPError("COLO failover is already activated")
        self._asked.set()
        if automatic is not None:
            log.warning("colo_automatic_failover", reason=automatic)
        kick = self._kick
        if kick is not None:
            kick()

    def lose_peer(self, why: str) -> bool:
        """The watchdog or a broken connection: fail over as x-colo-lost-heartbeat would; False if a failover
        is under way already."""
        try:
            self.lost_heartbeat(True, automatic=why)
        except QMPError:
            return False
        return True

    def await_failover(self, error: str | None, automatic: bool, peer: str, lose: Callable[[str], object],
                       check: Callable[[], None] = lambda: None) -> None:
        """After a side's loop ended: an ``error`` fails over at once when failover is ``automatic``
        (``lose``), else the side waits for x-colo-lost-heartbeat as QEMU does (``check`` may raise to stop
        waiting)."""
        if self.requested:
            return
        if error is not None and automatic:
            lose(f"the {peer} is lost: {error}")
            return
        while not self._asked.wait(POLL_S):
            check()

    def checkpoint_now(self, reason: str) -> bool:
        """Ask the primary for a checkpoint now (x-checkpoint-delay set, xen-colo-do-checkpoint); False if
        no primary runs here."""
        ask = self._checkpoint_asked
        if ask is None:
            return False
        ask(reason)
        return True

    def reason(self, source_in_colo: bool) -> COLOExitReason:
        """query-colo-status's reason (QEMU's mapping, its quirk included)."""
        f = self.failover
        if f is F.NONE:
            return COLOExitReason.NONE
        if f is F.COMPLETED:
            return COLOExitReason.REQUEST
        return COLOExitReason.PROCESSING if source_in_colo else COLOExitReason.ERROR
