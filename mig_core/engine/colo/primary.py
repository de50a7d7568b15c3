"""The primary's side of COLO, run on the migration thread after the initial migration.

The initial migration ends in ``device → colo`` instead of completed: the
last pass and the device state go as usual, then the primary waits for the
secondary's checkpoint-ready and runs again. From then on a checkpoint comes
every ``x-checkpoint-delay`` ms, when the outputs diverge, when the
comparison queue is full, or on request: checkpoint-request → (reply) → stop
→ vmstate-send, the RAM written since the last checkpoint, vmstate-size and
the device state with the held messages → (received, loaded) → release the
held messages → run. If the secondary is lost, the primary fails over and
runs alone.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol

import structlog

from mig_core.engine.colo import wire
from mig_core.engine.colo.heartbeat import Watchdog, interval_s
from mig_core.engine.colo.state import ColoState
from mig_core.engine.return_path import ColoOutput, ColoReply, ColoTraffic
from mig_core.engine.switchover import SwitchoverEngine, send_rest
from mig_core.errors import MigError, MigrationFailed, QMPError
from mig_core.ext import replication
from mig_core.ext.channel import ChannelError
from mig_core.ext.dirty_tracker import DirtyConsumer
from mig_core.ext.replication import Replication, Role
from mig_core.machine.device import DeviceStateError
from mig_core.machine.vcpu import VcpuStopTimeout
from mig_core.memory.zeropage import zero_mask
from mig_core.schema.common import RunState
from mig_core.schema.migration import COLOMessage as M
from mig_core.schema.migration import COLOMode
from mig_core.schema.migration import FailoverStatus as F
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream.format import Command


class ColoEngine(SwitchoverEngine, Protocol):
    """What COLO uses of the outgoing migration beyond its end (engine/outgoing.py)."""

    ignored: set[str]

    @property
    def _dirty(self) -> DirtyConsumer: ...

log = structlog.get_logger("mig.colo")

#: pages per write while a checkpoint sends RAM
BATCH_PAGES = 1024
#: how often a wait for the secondary looks at failover and cancel requests
POLL_S = 0.05


class FailoverRequested(Exception):
    """x-colo-lost-heartbeat (or the watchdog) asked this side to run alone."""


class CancelRequested(Exception):
    """migrate_cancel: end replication on purpose; the secondary is told not to take over."""


class CheckpointTrigger:
    """Why the next checkpoint comes now: a divergence, a full queue, a request, or nothing yet."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reason: str | None = None
        self._kicked = False

    def ask(self, reason: str) -> None:
        with self._cond:
            self._reason = self._reason or reason
            self._cond.notify_all()

    def kick(self) -> None:
        """Wake the waiter without asking for a checkpoint (a failover or a cancel to look at)."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> str | None:
        with self._cond:
            if self._reason is None and not self._kicked:
                self._cond.wait(timeout)
            reason, self._reason, self._kicked = self._reason, None, False
            return reason


class ColoPrimary:
    """COLO on the source after its initial migration (``OutgoingMigration`` owns the connection)."""

    def __init__(self, engine: ColoEngine, state: ColoState) -> None:
        self.engine = engine
        self.ctx = engine.ctx
        self.machine = engine.machine
        self.state = state
        self.trigger = CheckpointTrigger()
        self.replies: queue.Queue[M] = queue.Queue()
        self.cancelled = threading.Event()
        cls = replication.load(self.ctx.registry, "colo")
        self.repl: Replication = cls(Role.PRIMARY, self.machine.output.release, self.trigger.ask,
                                     int(self.ctx.parameter("x-colo-compare-limit")))
        self.watchdog: Watchdog | None = None
        self._lock = threading.Lock()
        self._running = False  # COLO runs: a cancel ends it on purpose
        self._begun = False  # the status reached colo (COLO_EXIT follows when it ends)

    # -- from other threads ------------------------------------------------------------------

    def cancel(self) -> bool:
        """migrate_cancel: True if COLO runs and will end on purpose; False before it runs (the engine then
        cancels the initial migration as any other)."""
        with self._lock:
            if not self._running:
                return False
            self.cancelled.set()
        self.trigger.kick()
        return True

    def _on_return_path(self, msg: ColoTraffic) -> None:
        if isinstance(msg, ColoReply):
            self.replies.put(wire.message(msg.value, "COLO reply"))
        elif isinstance(msg, ColoOutput):
            self.repl.peer_output(msg.packet)
        # heartbeats: their bytes are what the watchdog counts

    def _lost(self, why: str) -> None:
        if self.state.lose_peer(why):
            self.engine._ch.abort(f"COLO: {why}")  # a send blocked on a silent secondary returns

    # -- the migration thread ------------------------------------------------------------------

    def complete_into_colo(self) -> None:
        """The initial migration's end: stop, last pass and device state, wait for checkpoint-ready, run."""
        e = self.engine
        rp = e.return_path
        assert rp is not None  # x-colo opens it
        rp.on_colo = self._on_return_path
        rp.on_broken = self.trigger.kick  # a lost secondary wakes the loop at once
        send_rest(e)  # no storage handover: the primary keeps running on its own
        e.writer.write_end()
        e._flush()
        e._account(0, running=False)
        self._expect(M.CHECKPOINT_READY, initial=True)
        e.counters.finish()
        e.convergence.stop()
        with self._lock:
            e._check_cancel()  # a cancel before now cancels the initial migration as any other
            self._running = True  # from now a cancel ends COLO on purpose, telling the secondary
        if not e.status.cas(S.DEVICE, S.COLO):  # migrate_cancel moved it to cancelling meanwhile
            self._end_on_purpose()
            raise CancelRequested()
        self.state.begin(self.trigger.kick, self.trigger.ask, self.repl.stats)
        self._begun = True
        self.machine.output.divert(self.repl.output)
        self.machine.run.set(RunState.RUNNING)  # QEMU's colo_process_checkpoint: vm_start
        log.info("colo_started", mode="primary", downtime_ms=e.counters.downtime_ms)

    def run(self) -> None:
        """The checkpoint loop until a failover (or a cancel, raised as ``Cancelled`` for the engine)."""
        e = self.engine
        ch = e._ch
        self.watchdog = Watchdog("mig/colo/watchdog", lambda: int(self.ctx.parameter("x-colo-heartbeat-timeout")),
                                 lambda: ch.bytes_received, lambda: None, self._lost)
        self.watchdog.start()
        error: str | None = None
        try:
            while True:
                self._checkpoint(self._wait_for_trigger())
        except FailoverRequested:
            pass
        except CancelRequested:
            self._end_on_purpose()
            raise
        except (MigError, ChannelError, DeviceStateError, VcpuStopTimeout, OSError) as exc:
            error = (exc.desc if isinstance(exc, QMPError) else str(exc)) or type(exc).__name__
        finally:
            self.watchdog.stop()
        if error is not None:
            log.error("colo_error", mode="primary", error=error)
            self.ctx.set_error(f"COLO: {error}")
        self.state.exited(COLOMode.PRIMARY)
        self.state.await_failover(error, bool(self.ctx.parameter("x-colo-heartbeat-timeout")), "secondary",
                                  self._lost, self._check_cancelled)
        self._failover()

    def _wait_for_trigger(self) -> str:
        """Run until a checkpoint is due; send heartbeats meanwhile. Returns why the checkpoint comes."""
        e = self.engine
        due = time.monotonic() + self.ctx.parameter("x-checkpoint-delay") / 1000
        while True:
            self._check_requests()
            step = interval_s(int(self.ctx.parameter("x-colo-heartbeat-timeout")))
            reason = self.trigger.wait(max(0.0, min(step, due - time.monotonic())))
            self._check_requests()
            if reason is not None:
                return reason
            if time.monotonic() >= due:
                return "periodic"
            e.writer.write_command(Command.COLO_HEARTBEAT)
            e._flush()
            self._check_peer()

    def _check_requests(self) -> None:
        if self.state.requested:
            raise FailoverRequested()
        self._check_cancelled()

    def _check_peer(self) -> None:
        rp = self.engine.return_path
        failure = rp.failure() if rp is not None else None
        if failure is not None:
            raise MigrationFailed(failure)

    def _expect(self, want: M, initial: bool = False) -> None:
        """Wait for the secondary's ``want`` (QEMU's text if another message comes)."""
        while True:
            try:
                got = self.replies.get(timeout=POLL_S)
            except queue.Empty:
                if initial:
                    self.engine._check_cancel()
                elif self.state.requested:
                    raise FailoverRequested() from None
                self._check_peer()
                continue
            if got is not want:
                raise wire.unexpected(got, want)
            return

    def _checkpoint(self, reason: str) -> None:
        e, run, fig = self.engine, self.machine.run, self.state.figures
        wire.send(e.writer, M.CHECKPOINT_REQUEST)
        e._flush()
        self._expect(M.CHECKPOINT_REPLY)
        if self.state.requested:
            raise FailoverRequested()
        t0 = time.monotonic()
        was = run.set(RunState.COLO)  # stops the vCPUs; cont is refused meanwhile
        self.repl.checkpoint_started()
        wire.send(e.writer, M.VMSTATE_SEND)
        vmstate = wire.VmState(self.machine.devices.save_to_buffer(), self.repl.held()).encode()
        pages = self._send_ram()
        wire.send(e.writer, M.VMSTATE_SIZE, len(vmstate))
        for at in range(0, len(vmstate), wire.VMSTATE_CHUNK):
            e.writer.write_device_part(wire.VMSTATE_ID, 0, 1, vmstate[at:at + wire.VMSTATE_CHUNK])
        e._flush()
        e._account(pages, running=False)
        self._expect(M.VMSTATE_RECEIVED)
        # the secondary holds the whole checkpoint: the primary runs on while it applies it (QEMU waits for
        # vmstate-loaded); what the checkpoint carried is released only once it is loaded
        run.set(RunState.RUNNING if was is RunState.COLO else was)  # a primary the operator stopped stays so
        pause = (time.monotonic() - t0) * 1000
        self._expect(M.VMSTATE_LOADED)
        self.repl.checkpoint_done()
        loaded = (time.monotonic() - t0) * 1000
        fig.checkpoints += 1
        fig.reasons[reason] = fig.reasons.get(reason, 0) + 1
        fig.last_pause_ms, fig.max_pause_ms = round(pause, 3), round(max(fig.max_pause_ms, pause), 3)
        fig.total_pause_ms = round(fig.total_pause_ms + pause, 3)
        fig.last_pages, fig.last_vmstate_bytes = pages, len(vmstate)
        fig.last_loaded_ms = round(loaded, 3)
        log.debug("colo_checkpoint", reason=reason, pause_ms=round(pause, 3), loaded_ms=round(loaded, 3), pages=pages,
                  vmstate=len(vmstate))

    def _send_ram(self) -> int:
        """The pages written since the last checkpoint (zero ones as markers); how many went."""
        e = self.engine
        consumer = e._dirty
        report = consumer.collect()
        sent = 0
        for b in self.machine.blocks:
            if b.name in e.ignored:
                continue
            idx = report.pages[b.name]
            for i in range(0, len(idx), BATCH_PAGES):
                batch = idx[i:i + BATCH_PAGES]
                zero = zero_mask(b.read_words, batch)
                if zero.any():
                    e.writer.write_zero_pages(b, batch[zero])
                    batch = batch[~zero]
                if len(batch):
                    data = b.read_pages[batch] if consumer.wants_copies else None
                    if data is not None:
                        consumer.sent(b, batch, data)
                    e.writer.write_pages(b, batch, data)
            sent += len(idx)
        return sent

    # -- the end ------------------------------------------------------------------------------

    def _check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise CancelRequested()

    def _failover(self) -> None:
        """Run alone: release what is held, let output straight out, end the connection, completed."""
        t0 = time.monotonic()
        self.state.cas(F.REQUIRE, F.ACTIVE)
        e = self.engine
        e.status.cas(S.COLO, S.COMPLETED)
        self.repl.failover()
        self.machine.output.divert(None)
        e._ch.abort("COLO failover")
        self.repl.close()
        self.state.cas(F.ACTIVE, F.COMPLETED)
        self.state.failed_over(COLOMode.PRIMARY)
        self.state.end()
        if self.machine.run.state is not RunState.RUNNING:
            self.machine.run.set(RunState.RUNNING)
        self.state.figures.failover_ms = round((time.monotonic() - t0) * 1000, 3)
        log.info("colo_failover_done", mode="primary", ms=self.state.figures.failover_ms)

    def _end_on_purpose(self) -> None:
        """migrate_cancel: tell the secondary (so it does not take over), release what is held, run alone."""
        e = self.engine
        try:
            e.writer.write_command(Command.COLO_END)
            e._flush()
        except (ChannelError, OSError) as exc:
            log.warning("colo_end_not_sent", error=str(exc))
        self.repl.failover()
        self.machine.output.divert(None)
        self.repl.close()
        if self._begun:
            self.state.exited(COLOMode.PRIMARY)
            self.state.end()
        if self.machine.run.state is not RunState.RUNNING:
            self.machine.run.set(RunState.RUNNING)
