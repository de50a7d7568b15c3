"""COLO's QMP commands: x-colo-lost-heartbeat, query-colo-status, the xen-* replication commands that
drive the same machinery, and mig's x-query-colo-stats."""

from __future__ import annotations

from collections.abc import Callable

from mig_core.engine.colo.state import ColoState
from mig_core.errors import QMPError
from mig_core.schema.colo import ColoCheckpointReason, ColoCompareStats, ColoStats, XenSetReplicationArgs
from mig_core.schema.migration import COLOExitReason, COLOMode, COLOStatus, ReplicationStatus
from mig_core.schema.migration import MigrationStatus as S


class ColoCommands:
    """The commands over one host's ``ColoState``; ``source``/``destination`` read the two statuses."""

    def __init__(self, state: ColoState, source: Callable[[], S], destination: Callable[[], S],
                 compare_limit: Callable[[], int], error: Callable[[], str | None],
                 cancel: Callable[[], None]) -> None:
        self.state = state
        self._source = source
        self._destination = destination
        self._compare_limit = compare_limit
        self._error = error
        self._cancel = cancel

    def mode(self) -> COLOMode:
        if self._source() is S.COLO:
            return COLOMode.PRIMARY
        if self._destination() is S.COLO:
            return COLOMode.SECONDARY
        return COLOMode.NONE

    def lost_heartbeat(self) -> None:
        self.state.lost_heartbeat(self.mode() is not COLOMode.NONE)

    def status(self) -> COLOStatus:
        return COLOStatus(mode=self.mode(), last_mode=self.state.last_mode,
                          reason=self.state.reason(self._source() is S.COLO))

    def checkpoint(self) -> None:
        """xen-colo-do-checkpoint: a checkpoint now, which only the primary drives."""
        mode = self.mode()
        if mode is COLOMode.NONE:
            raise QMPError("VM is not in COLO mode")
        if mode is COLOMode.SECONDARY:
            raise QMPError("COLO checkpoints are driven by the primary; this side is the secondary")
        self.state.checkpoint_now("request")

    def set_replication(self, args: XenSetReplicationArgs) -> None:
        """xen-set-replication: enable checks the role this side has; disable fails over (``failover``) or
        ends replication on purpose as migrate_cancel does (primary only)."""
        failover = args.failover is True
        if args.enable and failover:
            raise QMPError("Parameter 'failover' is only for stopping replication")
        mode, want = self.mode(), COLOMode.PRIMARY if args.primary else COLOMode.SECONDARY
        if mode is COLOMode.NONE:
            raise QMPError("VM is not in COLO mode")
        if mode is not want:
            raise QMPError(f"COLO runs here as {mode.value}, not {want.value}")
        if args.enable:
            return  # replication runs in that role already (it starts with the x-colo migration)
        if failover:
            self.state.lost_heartbeat(True)
            return
        if mode is COLOMode.SECONDARY:
            raise QMPError("only the primary can stop replication without a failover")
        self._cancel()

    def replication_status(self) -> ReplicationStatus:
        """query-xen-replication-status: an error if this side's last COLO run ended in one."""
        if self.state.last_exit is COLOExitReason.ERROR:
            return ReplicationStatus(error=True, desc=self._error() or "COLO ended with an error")
        return ReplicationStatus(error=False)

    def stats(self) -> ColoStats:
        f, mode = self.state.figures, self.mode()
        out = ColoStats(mode=(mode if mode is not COLOMode.NONE else self.state.last_mode).value,
                        checkpoints=f.checkpoints,
                        reasons=[ColoCheckpointReason(reason=r, count=n) for r, n in sorted(f.reasons.items())],
                        last_pause_ms=f.last_pause_ms, last_loaded_ms=f.last_loaded_ms,
                        max_pause_ms=f.max_pause_ms, total_pause_ms=f.total_pause_ms,
                        last_pages=f.last_pages, last_vmstate_bytes=f.last_vmstate_bytes)
        if self.state.has_compare:
            c = self.state.compare()
            out.compare = ColoCompareStats(queue_depth=c.queue_depth, max_queue_depth=c.max_queue_depth,
                                           queue_limit=self._compare_limit(), matched=c.matched,
                                           released_unmatched=c.released_unmatched, mismatches=c.mismatches,
                                           queue_full=c.queue_full)
        if f.failover_ms is not None:
            out.failover_ms = f.failover_ms
        return out
