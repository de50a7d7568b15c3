"""The secondary's side of COLO, run on the incoming thread after the initial load.

The secondary copies its RAM into a cache, starts dirty tracking, runs and
sends checkpoint-ready. Its program's output goes to the primary for
comparison and is kept here, never released, until it takes over. Each
checkpoint: request → stop, reply → the primary's RAM delta into the cache and
its device state into a buffer → received → flush the cache into RAM (pages the
primary sent and pages this side wrote), apply the devices → loaded → run. A
checkpoint cut before its end changes nothing in RAM or devices. If the primary
is lost, the secondary fails over and runs as the service.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import structlog

from mig_core.engine.colo import wire
from mig_core.engine.colo.cache import RamCache
from mig_core.engine.colo.heartbeat import Watchdog
from mig_core.engine.colo.state import ColoState
from mig_core.engine.context import EngineContext, StatusCell
from mig_core.engine.return_path import ColoHeartbeat, ColoOutput, ColoReply, DestinationReturnPath
from mig_core.errors import MigError
from mig_core.ext.channel import Channel, ChannelError
from mig_core.ext.dirty_tracker import DirtyConsumer
from mig_core.machine.device import DeviceStateError
from mig_core.machine.machine import Machine
from mig_core.machine.vcpu import VcpuStopTimeout
from mig_core.schema.common import RunState
from mig_core.schema.migration import COLOMessage as M
from mig_core.schema.migration import COLOMode
from mig_core.schema.migration import FailoverStatus as F
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream.format import Command
from mig_core.stream.reader import CommandReceived, DevicePart, Item, PagesReceived, StreamError, StreamReader


class IncomingSide(Protocol):
    """What COLO uses of the incoming migration whose load it continues (engine/incoming.py)."""

    ctx: EngineContext
    machine: Machine
    status: StatusCell
    channel: Channel | None
    return_path: DestinationReturnPath | None
    reader: StreamReader

log = structlog.get_logger("mig.colo")


class FailoverRequested(Exception):
    """x-colo-lost-heartbeat (or the watchdog) asked this side to take over."""


class PrimaryEnded(Exception):
    """The primary ended replication on purpose (migrate_cancel there): this side must not take over."""


class ColoSecondary:
    """COLO on the destination after its initial load (``IncomingMigration`` owns the connection)."""

    def __init__(self, incoming: IncomingSide, state: ColoState) -> None:
        self.incoming = incoming
        self.ctx = incoming.ctx
        self.machine = incoming.machine
        self.state = state
        assert incoming.channel is not None and incoming.return_path is not None  # x-colo opens it
        self.channel = incoming.channel
        self.rp: DestinationReturnPath = incoming.return_path
        self._lock = threading.Lock()
        #: output this side's program emitted since the last checkpoint, after the messages the primary held
        #: at that checkpoint: released if this side takes over (the world drops repeats by their sequence)
        self._kept: list[bytes] = []
        self._taken_over = False
        self._busy = False  # loading a checkpoint: silence from the primary is expected, a failover waits
        self.cache: RamCache | None = None
        self.consumer: DirtyConsumer | None = None

    # -- from other threads ---------------------------------------------------------------

    def _output(self, packet: bytes) -> None:
        with self._lock:
            if self._taken_over:
                self.machine.output.release([packet])
                return
            self._kept.append(packet)
        try:
            self.rp.send(ColoOutput(packet))
        except (ChannelError, MigError, OSError):
            pass  # the primary is gone: the message stays kept, for the failover

    def _kick(self) -> None:
        """A failover was asked for: after the checkpoint being loaded (QEMU's relaunch), else at once."""
        with self._lock:
            if self._busy and self.state.cas(F.REQUIRE, F.RELAUNCH):
                return
        self.channel.abort("COLO failover")

    # -- the incoming thread ---------------------------------------------------------------

    def run(self) -> None:
        """From the end of the initial load until a failover (or the primary ends COLO)."""
        machine, status = self.machine, self.incoming.status
        if not status.cas(S.ACTIVE, S.COLO):
            raise StreamError("the incoming migration left state active before COLO started")
        self.cache = RamCache(machine.blocks)
        machine.start_tracking()
        self.consumer = machine.tracker().consumer("colo")
        self.consumer.collect()  # from here on: what this side writes
        reader = StreamReader.continuing(self.channel, self.incoming.reader.source_blocks, self.cache)
        self.state.begin(self._kick, None)
        machine.output.divert(self._output)
        machine.activate_block_nodes()
        machine.run.set(RunState.RUNNING)  # QEMU's secondary always runs
        self.rp.send(ColoReply(wire.NUMBER[M.CHECKPOINT_READY]))
        log.info("colo_started", mode="secondary")
        watchdog = Watchdog("mig/colo/watchdog", lambda: int(self.ctx.parameter("x-colo-heartbeat-timeout")),
                            lambda: self.channel.bytes_received, lambda: self.rp.send(ColoHeartbeat()),
                            self.state.lose_peer, watching=lambda: not self._busy)
        watchdog.start()
        error: str | None = None
        try:
            while True:
                self._checkpoint(reader)
        except FailoverRequested:
            pass
        except PrimaryEnded:
            watchdog.stop()
            self._primary_ended()
            return
        except (MigError, ChannelError, DeviceStateError, VcpuStopTimeout, OSError) as e:
            error = str(e) or type(e).__name__
        finally:
            watchdog.stop()
        if error is not None:
            if self.state.requested:  # the failover's own abort of the connection
                error = None
            else:
                log.error("colo_error", mode="secondary", error=error)
                self.ctx.set_error(f"COLO: {error}")
        self.state.exited(COLOMode.SECONDARY)
        self.state.await_failover(error, bool(self.ctx.parameter("x-colo-heartbeat-timeout")), "primary",
                                  self.state.lose_peer)
        self._failover()

    def _command(self, reader: StreamReader) -> CommandReceived:
        """The primary's next command, heartbeats skipped; COLO_END ends replication."""
        while True:
            item = reader.next()
            if isinstance(item, CommandReceived) and item.command is Command.COLO_HEARTBEAT:
                continue
            if isinstance(item, CommandReceived) and item.command is Command.COLO_END:
                raise PrimaryEnded()
            if not (isinstance(item, CommandReceived) and item.command is Command.COLO_MESSAGE):
                raise StreamError(f"COLO: expected a COLO message, got {_name(item)}")
            return item

    def _expect(self, reader: StreamReader, want: M) -> object:
        got, arg = wire.parse(self._command(reader))
        if got is not want:
            raise wire.unexpected(got, want)
        return arg

    def _checkpoint(self, reader: StreamReader) -> None:
        got, _ = wire.parse(self._command(reader))
        if got is not M.CHECKPOINT_REQUEST:
            raise StreamError(f"Got unknown COLO message: {wire.NUMBER[got]}")
        if self.state.requested:
            raise FailoverRequested()
        run = self.machine.run
        was = run.set(RunState.COLO)
        self.rp.send(ColoReply(wire.NUMBER[M.CHECKPOINT_REPLY]))
        self._expect(reader, M.VMSTATE_SEND)
        while True:  # the RAM delta lands in the cache
            item = reader.next()
            if isinstance(item, PagesReceived):
                continue
            if not (isinstance(item, CommandReceived) and item.command is Command.COLO_MESSAGE):
                raise StreamError(f"COLO: expected pages or vmstate-size, got {_name(item)}")
            got, size = wire.parse(item)
            if got is not M.VMSTATE_SIZE:
                raise wire.unexpected(got, M.VMSTATE_SIZE)
            break
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 1 << 32:
            raise StreamError(f"COLO: bad vmstate size {size!r}")
        buf = bytearray()
        while len(buf) < size:
            part = reader.next()
            if not (isinstance(part, DevicePart) and part.id == wire.VMSTATE_ID):
                raise StreamError(f"COLO: expected the vmstate buffer, got {_name(part)}")
            buf += part.chunk
        if len(buf) != size:
            raise StreamError(f"COLO: vmstate buffer of {len(buf)} bytes, announced {size}")
        self.rp.send(ColoReply(wire.NUMBER[M.VMSTATE_RECEIVED]))
        self._apply(bytes(buf))
        self.rp.send(ColoReply(wire.NUMBER[M.VMSTATE_LOADED]))
        run.set(RunState.RUNNING if was is RunState.COLO else was)
        if self.state.failover is F.RELAUNCH:
            raise FailoverRequested()

    def _apply(self, buf: bytes) -> None:
        """The whole checkpoint is here: check the device state, then RAM and devices together."""
        assert self.cache is not None and self.consumer is not None
        with self._lock:
            self._busy = True
        try:
            t0 = time.monotonic()
            vm = wire.VmState.decode(buf)
            staged = self.machine.devices.stage_buffer(vm.devices)  # a bad buffer stops here: nothing changed
            pages = self.cache.flush(self.consumer.collect().pages)
            staged.apply(require_all=False)
            self.consumer.collect()  # the flush's own writes are the primary's state, not this side's
            with self._lock:
                self._kept = list(vm.held)
            log.debug("colo_checkpoint_loaded", pages=pages, ms=round((time.monotonic() - t0) * 1000, 3))
        finally:
            with self._lock:
                self._busy = False

    # -- the end ----------------------------------------------------------------------------

    def _failover(self) -> None:
        """Take over: release what was kept, let output straight out, run as the service."""
        t0 = time.monotonic()
        if not self.state.cas(F.REQUIRE, F.ACTIVE):
            self.state.cas(F.RELAUNCH, F.ACTIVE)
        self.incoming.status.cas(S.COLO, S.COMPLETED)
        with self._lock:
            self._taken_over = True
            kept, self._kept = self._kept, []
            self.machine.output.release(kept)
        self.machine.output.divert(None)
        self.channel.abort("COLO failover")
        self._close_tracking()
        self.state.cas(F.ACTIVE, F.COMPLETED)
        self.state.failed_over(COLOMode.SECONDARY)
        self.state.end()
        if self.machine.run.state is not RunState.RUNNING:
            self.machine.run.set(RunState.RUNNING)
        self.state.figures.failover_ms = round((time.monotonic() - t0) * 1000, 3)
        log.info("colo_failover_done", mode="secondary", released=len(kept), ms=self.state.figures.failover_ms)

    def _primary_ended(self) -> None:
        """The primary cancelled replication: this side stops (its state is not the service's) and fails."""
        error = "COLO: the primary ended replication (migrate_cancel); this side stays stopped"
        self.ctx.set_error(error)
        self.machine.output.divert(None)
        self._close_tracking()
        if self.machine.run.state is RunState.RUNNING:
            self.machine.run.set(RunState.PAUSED)
        self.incoming.status.cas(S.COLO, S.FAILED)
        self.state.exited(COLOMode.SECONDARY)
        self.state.end()
        log.warning("colo_primary_ended")

    def _close_tracking(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.cache = None


def _name(item: Item) -> str:
    if isinstance(item, CommandReceived):
        return f"command {item.command.name}"
    return type(item).__name__
