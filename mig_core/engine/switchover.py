"""The end of an outgoing migration: may it switch over (switchover-ack), stop the machine, send the rest, report.

Precopy completion lives here; the switch to postcopy (engine/postcopy/switch.py)
stops the machine and reports completion the same way.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Protocol

import numpy as np
import structlog

from mig_core.engine.context import EngineContext, StatusCell
from mig_core.engine.convergence import ConvergenceTrigger
from mig_core.engine.device_iteration import DeviceIteration
from mig_core.engine.multifd_send import MultifdSender
from mig_core.engine.return_path import SourceReturnPath
from mig_core.engine.stats import MigrationCounters, now_ms
from mig_core.errors import MigrationFailed
from mig_core.ext.channel import Channel
from mig_core.machine.machine import Machine
from mig_core.memory.pagemap import union_pages
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream.format import Command
from mig_core.stream.mapped_ram import MappedRamWriter
from mig_core.stream.writer import StreamWriter

log = structlog.get_logger("mig.outgoing")


class SwitchoverEngine(Protocol):
    """What the end of a migration uses of the outgoing migration."""

    ctx: EngineContext
    machine: Machine
    status: StatusCell
    caps: dict[C, bool]
    counters: MigrationCounters
    writer: StreamWriter
    device_state: DeviceIteration
    continue_event: threading.Event
    return_path: SourceReturnPath | None
    multifd: MultifdSender | None
    mapped: MappedRamWriter | None
    convergence: ConvergenceTrigger
    pending: dict[str, np.ndarray]
    _runstate_before: RunState | None

    @property
    def _ch(self) -> Channel: ...

    def _account(self, pages: int, running: bool) -> None: ...

    def _check_cancel(self) -> None: ...

    def _flush(self) -> None: ...

    def _sync(self) -> dict[str, np.ndarray]: ...

    def _send_all(self, pages: dict[str, np.ndarray], running: bool) -> None: ...

    def _end_pass(self, running: bool) -> None: ...


def switchover_allowed(engine: SwitchoverEngine, wait_s: float = 0.0) -> bool:
    """QEMU's rule: switchover-ack off, the machine not running, or the destination acked; waits up to
    ``wait_s`` for the ack (the time shows in the last pass's ``switchover_ack_wait_ms``)."""
    rp = engine.return_path
    if not engine.caps[C.SWITCHOVER_ACK] or rp is None or engine.machine.run.state is not RunState.RUNNING:
        return True
    if rp.switchover_acked.is_set() or not wait_s:
        return rp.switchover_acked.is_set()
    t0 = time.monotonic()
    rp.switchover_acked.wait(wait_s)
    failure = rp.failure()
    if failure is not None:
        raise MigrationFailed(failure)
    waited = (time.monotonic() - t0) * 1000
    passes = engine.counters.passes
    if passes:
        passes[-1] = dataclasses.replace(passes[-1], switchover_ack_wait_ms=round(
            passes[-1].switchover_ack_wait_ms + waited, 3))
    return rp.switchover_acked.is_set()


def stop_machine(engine: SwitchoverEngine, postcopy: bool) -> None:
    """Stop the machine (finish-migrate), wait in pre-switchover if asked, reach ``device``."""
    c, run, status = engine.counters, engine.machine.run, engine.status
    log.info("switchover", expected_downtime_ms=c.expected_downtime, remaining=c.remaining,
             bandwidth_bytes_per_ms=round(c.bandwidth, 1), passes=c.dirty_sync_count, postcopy=postcopy)
    if not (engine._runstate_before is not None and run.state is RunState.FINISH_MIGRATE):
        stop_for_switchover(engine)
    # else: a CPR mode stopped it when the migration connected
    engine.ctx.hooks.switchover(engine.ctx.migration_id, status.side)
    if engine.caps[C.PAUSE_BEFORE_SWITCHOVER]:
        if not status.cas(S.ACTIVE, S.PRE_SWITCHOVER):
            engine._check_cancel()
        engine.continue_event.wait()
        engine._check_cancel()
        if not status.cas(S.PRE_SWITCHOVER, S.DEVICE):
            engine._check_cancel()
    elif not status.cas(S.ACTIVE, S.DEVICE):
        engine._check_cancel()
    engine.writer.write_command(Command.SWITCHOVER_START)
    engine._account(0, running=True)  # what was written before the machine stopped
    log.debug("switchover_stopped", ms_since_stop=now_ms() - (c.downtime_start_ms or 0))


def stop_for_switchover(engine: SwitchoverEngine) -> None:
    """Stop the vCPUs (finish-migrate) and start the downtime clock; from here until the end cont is
    refused, so nothing resumes them before the destination has everything."""
    run = engine.machine.run
    engine.counters.downtime_start_ms = now_ms()
    # set() returns the state it replaced, under the run-state lock; the read before it is what a failure
    # restores if stopping raises (VcpuStopTimeout) and set() with it
    engine._runstate_before = run.state
    engine._runstate_before = run.set(RunState.FINISH_MIGRATE)
    engine.ctx.global_state.saved_runstate = engine._runstate_before


def complete_precopy(engine: SwitchoverEngine) -> None:
    """Stop, send the last pass and the device state, and complete once the destination confirms it."""
    c = engine.counters
    send_rest(engine)
    engine.machine.inactivate_block_nodes()  # storage goes to the destination (re-activated on failure)
    engine.writer.write_end()
    engine._flush()
    engine._ch.finish()
    if engine.multifd is not None:
        engine.multifd.finish()
    engine._account(0, running=False)
    log.debug("switchover_sent", ms_since_stop=now_ms() - (c.downtime_start_ms or 0))
    if engine.return_path is not None:  # complete only once the destination confirms it loaded everything
        engine.return_path.await_end(engine._check_cancel)
    report_completed(engine, S.DEVICE)


def send_rest(engine: SwitchoverEngine) -> None:
    """Stop the machine, then send what is still dirty and every device's final state (the end of a
    precopy migration, and COLO's way into its first checkpoint)."""
    c = engine.counters
    stop_machine(engine, postcopy=False)
    final = engine._sync()
    merged = {b.name: union_pages(engine.pending[b.name], final[b.name], b.npages) for b in engine.machine.blocks}
    log.debug("switchover_synced", ms_since_stop=now_ms() - (c.downtime_start_ms or 0),
              pages=sum(len(p) for p in merged.values()))
    engine._send_all(merged, running=False)
    engine._end_pass(running=False)
    if engine.mapped is not None:
        engine.mapped.write_bitmaps(engine._ch)
        engine._account(0, running=False)
    log.debug("switchover_ram_sent", ms_since_stop=now_ms() - (c.downtime_start_ms or 0))
    engine.device_state.save_final(engine.writer)


def report_completed(engine: SwitchoverEngine, current: S, **figures: Any) -> None:
    """Freeze the clocks and move ``current`` to completed, the source in postmigrate first (so whoever
    sees completed sees postmigrate too, and the operator's dirty limits back in place)."""
    c, run = engine.counters, engine.machine.run
    c.finish()
    engine.convergence.stop()
    run.set(RunState.POSTMIGRATE)
    if not engine.status.cas(current, S.COMPLETED):
        run.set(RunState.FINISH_MIGRATE)  # not completed after all: the failure path decides the run state
        engine._check_cancel()
    log.info("migration_completed", total_ms=c.total_time(), downtime_ms=c.downtime_ms,
             transferred=c.transferred, **figures)
