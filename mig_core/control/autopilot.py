"""The autopilot (opt-in, off by default): a hook plugin that changes a non-converging migration's course.

When ``AutopilotPolicy`` says the migration is not converging, it switches to postcopy where the
``postcopy-ram`` capability is on; else it applies a dirty limit (or halves the one applied) where writes
are attributed to vCPUs and auto-converge is not on; else it steps auto-converge's throttle. Each decision
is a ``MIG_AUTOPILOT`` event, a line of the flight record (``autopilot``) and an entry of
``x-query-migration-autopilot``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import structlog

from mig_core.control.events import EventEmitter
from mig_core.control.flight_recorder import FlightRecorder
from mig_core.control.status import StatusMachine
from mig_core.engine.autopilot import AutopilotPolicy
from mig_core.engine.outgoing import OutgoingMigration
from mig_core.errors import QMPError
from mig_core.plugin.hookspecs import hookimpl
from mig_core.schema.autopilot import AutopilotDecision, MigrationAutopilotInfo, XSetMigrationAutopilotArgs
from mig_core.schema.common import Side
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S

log = structlog.get_logger("mig.autopilot")

STALLED_RANGE = (1, 100)


class PilotedHost(Protocol):
    """What the autopilot uses of the manager."""

    caps: dict[C, bool]
    source: StatusMachine
    outgoing: OutgoingMigration | None
    events: EventEmitter
    recorder: FlightRecorder

    def per_vcpu_dirty_available(self) -> bool: ...

    def migrate_start_postcopy(self) -> None: ...

    def advice_for_next_migration(self) -> dict[str, Any] | None: ...


class Autopilot:
    """One host's autopilot: its settings and the decisions of the current or last migration."""

    def __init__(self, host: PilotedHost) -> None:
        self.host = host
        self.enabled = False
        self.policy = AutopilotPolicy()
        self.decisions: list[AutopilotDecision] = []
        self._migration_id = ""
        self._t0 = 0.0
        self._lock = threading.Lock()

    def configure(self, args: XSetMigrationAutopilotArgs) -> None:
        """x-set-migration-autopilot: takes effect at the next pass (of a running migration too)."""
        stalled = args.stalled_passes if isinstance(args.stalled_passes, int) else self.policy.stalled_passes
        deadline = args.deadline if isinstance(args.deadline, int) else self.policy.deadline_ms
        if not STALLED_RANGE[0] <= stalled <= STALLED_RANGE[1]:
            raise QMPError(f"Parameter 'stalled-passes' expects a value between {STALLED_RANGE[0]} and "
                           f"{STALLED_RANGE[1]}")
        if deadline < 0:
            raise QMPError("Parameter 'deadline' expects a value of 0 (none) or more ms")
        with self._lock:
            self.enabled = bool(args.enabled)
            self.policy.stalled_passes, self.policy.deadline_ms = stalled, deadline
        log.info("autopilot_set", enabled=self.enabled, stalled_passes=stalled, deadline_ms=deadline)

    def query(self) -> MigrationAutopilotInfo:
        with self._lock:
            return MigrationAutopilotInfo(enabled=self.enabled, stalled_passes=self.policy.stalled_passes,
                                          deadline=self.policy.deadline_ms, decisions=list(self.decisions))

    @hookimpl
    def mig_status_changed(self, side: Side, old: S, new: S, migration_id: str) -> None:
        if side is not Side.SOURCE or new is not S.SETUP or migration_id == self._migration_id:
            return
        advice = self.host.advice_for_next_migration()
        strategy = ("auto-converge" if self.host.caps[C.AUTO_CONVERGE] else
                    "dirty-limit" if self.host.caps[C.DIRTY_LIMIT] else "precopy")
        pred = next((p for p in (advice or {}).get("predictions", []) if p["strategy"] == strategy), None)
        with self._lock:
            self._migration_id, self._t0 = migration_id, time.monotonic()
            self.decisions = []
            if pred is None:
                self.policy.start(None)
            else:
                self.policy.start(pred.get("total-time"), bool(pred["converges"]))

    @hookimpl
    def mig_pass_completed(self, migration_id: str, pass_number: int, dirty_bytes: int) -> None:
        with self._lock:
            if not self.enabled or migration_id != self._migration_id:
                return
            reason = self.policy.observe(pass_number, dirty_bytes, (time.monotonic() - self._t0) * 1000)
        if reason is not None:
            self._act(migration_id, pass_number, reason)

    def _act(self, migration_id: str, pass_number: int, reason: str) -> None:
        host, out = self.host, self.host.outgoing
        if out is None or host.source.state is not S.ACTIVE:
            return
        if host.caps[C.POSTCOPY_RAM]:
            if out.postcopy_requested.is_set():
                return
            host.migrate_start_postcopy()
            action, applied = "postcopy", "migrate-start-postcopy"
        elif host.per_vcpu_dirty_available() and out.convergence.mode != "auto-converge":
            action, applied = "dirty-limit", out.convergence.engage("dirty-limit")
        else:
            action, applied = "auto-converge", out.convergence.engage("auto-converge")
        decision = AutopilotDecision(pass_=pass_number, action=action, applied=applied, reason=reason)
        with self._lock:
            self.decisions.append(decision)
        log.info("autopilot_decision", action=action, applied=applied, reason=reason, pass_number=pass_number)
        host.events.emit("MIG_AUTOPILOT", decision)
        host.recorder.add(Side.SOURCE, migration_id, "autopilot",
                          {"pass": pass_number, "action": action, "applied": applied, "reason": reason})
