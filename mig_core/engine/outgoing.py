"""The source side of a precopy migration, run in its own thread.

setup (connect, header, first dirty sync) → active (passes: sync, send what is
dirty, until the rest fits downtime-limit at the measured bandwidth) → stop the
machine → (pre-switchover) → device (last pass, device state, end) → completed,
after the destination confirms over the return path when there is one. Any
failure or a cancel leaves the source running with its RAM and devices as they
were, and a new migration can start.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import structlog

from mig_core.engine import dirty_bitmaps
from mig_core.engine.colo.primary import CancelRequested, ColoPrimary
from mig_core.engine.context import EngineContext
from mig_core.engine.convergence import ConvergenceTrigger
from mig_core.engine.device_iteration import DeviceIteration
from mig_core.engine.held_pages import encode_runs, unpopulated
from mig_core.engine.multifd_send import MultifdSender, connect_sender
from mig_core.engine.postcopy.source import PostcopySender
from mig_core.engine.postcopy.switch import run_postcopy
from mig_core.engine.ram_pass import account_and_pace, send_pages
from mig_core.engine.return_path import SourceReturnPath
from mig_core.engine.snapshot.background import run_background_snapshot
from mig_core.engine.stats import MigrationCounters, PassRecord, RateLimiter, SourceStats, now_ms
from mig_core.engine.switchover import complete_precopy, stop_for_switchover, switchover_allowed
from mig_core.engine.unplug import Unplugs
from mig_core.engine.write_behind import WriteBehind
from mig_core.engine.xbzrle_send import XbzrleSender
from mig_core.errors import MigrationFailed, QMPError
from mig_core.ext.channel import Channel, ChannelAborted, ChannelError
from mig_core.ext.dirty_tracker import DirtyConsumer
from mig_core.machine.block_data import BlockDataDevice
from mig_core.machine.device import DeviceStateError
from mig_core.machine.vcpu import VcpuStopTimeout
from mig_core.memory.ram import RAMBlock
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigMode, VfioStats
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream import mapped_ram
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.format import Command
from mig_core.stream.mapped_ram import MappedRamWriter
from mig_core.stream.reader import StreamError
from mig_core.stream.writer import StreamWriter

if TYPE_CHECKING:
    from mig_core.ext.transport import Transport
    from mig_core.schema.migration import MigrationAddress

log = structlog.get_logger("mig.outgoing")


class Cancelled(Exception):
    """migrate_cancel was called."""


class OutgoingMigration:
    """One outgoing migration; ``start()`` runs it in a thread named ``live_migration``."""

    def __init__(self, ctx: EngineContext, transport: Transport, addr: MigrationAddress) -> None:
        self.ctx = ctx
        self.status = ctx.status
        self.machine = ctx.machine
        self.transport = transport
        self.addr = addr
        self.caps = dict(ctx.capabilities())
        params = ctx.parameters
        self.counters = MigrationCounters(page_size=min((b.page_size for b in self.machine.blocks), default=4096))
        #: x-ignore-shared: blocks that are shared mappings of a file, which the destination maps too (not sent)
        self.ignored = {b.name for b in self.machine.blocks if self.caps[C.X_IGNORE_SHARED] and b.shared_file}
        self.counters.total = sum(b.size for b in self.machine.blocks if b.name not in self.ignored)
        self.channel: Channel | None = None
        self.cancel_requested = threading.Event()
        self.continue_event = threading.Event()
        #: migrate-start-postcopy was called: switch at the next batch (postcopy-ram decides whether it can)
        self.postcopy_requested = threading.Event()
        #: pages the pass being sent had not reached when the switch to postcopy came
        self._unsent: dict[str, np.ndarray] | None = None
        self.postcopy: PostcopySender | None = None
        #: ``migrate resume=true`` on a paused postcopy: (transport, address) of the new connection
        self.resume_requests: queue.Queue[tuple[Transport, MigrationAddress]] = queue.Queue()
        self.limiter = RateLimiter(params()["max-bandwidth"])
        self.thread = threading.Thread(target=self._run, name="live_migration", daemon=True)
        self.return_path: SourceReturnPath | None = None
        #: x-colo: the primary's side once the initial migration reached its end
        self.colo: ColoPrimary | None = None
        self._consumer: DirtyConsumer | None = None
        #: pages the destination may hold non-zero (so a page that becomes zero must be sent as zero)
        self._sent_nonzero = {b.name: np.zeros(b.npages, dtype=bool) for b in self.machine.blocks}
        self._runstate_before: RunState | None = None
        #: why fail() ended the migration
        self._failure: str | None = None
        self._dirty_pass_bandwidth = 0.0
        self._dirty_pass_measured = False  # a pass of more than 1 MiB gave _dirty_pass_bandwidth
        self._sync_ms = 0.0
        self.device_state = DeviceIteration(self.machine.devices)
        self.unplugs = Unplugs(self.machine.devices, ctx.device_unplugged)
        self._device_pending = 0
        mode = ("auto-converge" if self.caps[C.AUTO_CONVERGE]
                else "dirty-limit" if self.caps[C.DIRTY_LIMIT] else None)
        self.convergence = ConvergenceTrigger(mode, params, self.machine.vcpus, ctx.dirty_limiter)
        self._block_index = {b.name: i for i, b in enumerate(self.machine.blocks)}
        self.xbzrle = XbzrleSender(params()["xbzrle-cache-size"], self.counters.page_size,
                                   [b.npages for b in self.machine.blocks])
        self._accounted = 0
        self.multifd: MultifdSender | None = None
        self.mapped: MappedRamWriter | None = None
        self._out: WriteBehind | None = None
        self._pinned: list[RAMBlock] = []
        zdp = params()["zero-page-detection"].value
        # where zero pages are found: here, per batch (legacy, or multifd without multifd); in
        # MultifdSender.send, still on this thread but while the channels write (multifd); or nowhere
        self._main_thread_zero = zdp == "legacy" or (zdp == "multifd" and not self.caps[C.MULTIFD])

    @property
    def _ch(self) -> Channel:
        """The main channel (connected in setup; the sending methods run only after)."""
        assert self.channel is not None
        return self.channel

    @property
    def _dirty(self) -> DirtyConsumer:
        """This migration's dirty-tracking consumer (made in setup; the sending methods run only after)."""
        assert self._consumer is not None
        return self._consumer

    # -- control from other threads ---------------------------------------------------

    def start(self) -> None:
        self.counters.start()
        self.thread.start()

    def use_channel(self, channel: Channel) -> None:
        """The main channel, connected already (transports that connect synchronously do it in migrate)."""
        self.channel = channel

    def continue_switchover(self) -> None:
        """migrate-continue in pre-switchover: go on to the device stage."""
        self.continue_event.set()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: a sticky request, acted on before the next batch of pages."""
        self.postcopy_requested.set()

    def pause_postcopy(self) -> None:
        """migrate-pause: break the connection; the migration thread then waits in postcopy-paused."""
        if self.channel is not None:
            self.channel.abort("Postcopy migration is paused by the user")

    def resume_postcopy(self, transport: Transport, addr: MigrationAddress) -> None:
        """migrate resume=true: the paused migration thread connects there and recovers."""
        self.resume_requests.put((transport, addr))

    def use_connection(self, channel: Channel) -> None:
        """Continue the stream on a new connection (postcopy recovery): new write-behind, writer and counts."""
        if self._out is not None:
            self._out.close()
        self.channel = channel
        self._accounted = 0
        self._out = WriteBehind(channel)
        self.writer = StreamWriter(self._out, self.machine.blocks, self.caps[C.X_CHECKSUMS])

    def _postcopy_due(self) -> bool:
        return self.caps[C.POSTCOPY_RAM] and self.postcopy_requested.is_set() and self._switchover_allowed()

    @property
    def started(self) -> bool:
        """Whether the migration thread has started (a cancel before then ends it at once)."""
        return self.thread.ident is not None

    def cancel(self) -> None:
        """Unblock whatever the migration thread waits on; it then ends as cancelled."""
        self.cancel_requested.set()
        if self.colo is not None and self.colo.cancel():  # COLO runs: ended on purpose, the secondary told
            return
        self.continue_event.set()
        if self.return_path is not None:
            self.return_path.wake()
        if self.channel is not None:
            self.channel.abort("migration cancelled")
        if self.multifd is not None:
            self.multifd.abort("migration cancelled")

    def fail(self, reason: str) -> None:
        """End the migration as failed with ``reason`` (a migration blocker forced in while it runs)."""
        self._failure = reason
        self.cancel()  # unblocks whatever the thread waits on; it then reports the failure, not a cancel

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled()
        if self.multifd is not None and self.multifd.error is not None:
            raise MigrationFailed(self.multifd.error)
        failure = self.return_path.failure() if self.return_path is not None else None
        if failure is not None:  # the destination gave up (or its return path broke) before the end
            raise MigrationFailed(failure)

    # -- the migration thread ------------------------------------------------------------

    def _run(self) -> None:
        status = self.status
        error: str | None = None
        failed = False
        try:
            self._setup()
            if self.caps[C.BACKGROUND_SNAPSHOT]:
                run_background_snapshot(self)
            else:
                self._iterate()
                if self._unsent is not None:
                    self._postcopy()
                elif self.caps[C.X_COLO]:
                    self._colo()
                else:
                    self._complete()
        except Cancelled:
            failed = True
        except (MigrationFailed, QMPError, ChannelError, StreamError, DeviceStateError, VcpuStopTimeout,
                OSError) as e:
            failed = True
            if not (self.cancel_requested.is_set() or isinstance(e, ChannelAborted)):
                error = (e.desc if isinstance(e, QMPError) else str(e)) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - a bug must still leave the source intact
            log.exception("migration_thread_crashed")
            failed = True
            error = f"internal error: {type(e).__name__}: {e}"
        finally:
            # channels, children and threads are gone before the final status is reported (QEMU's
            # migrate_fd_cleanup): whoever sees cancelled or failed may start the next migration
            try:
                self._cleanup()
            except Exception:  # noqa: BLE001 - the status must still reach its end
                log.exception("migration_cleanup_failed")
        if failed:
            self._end_unsuccessfully(self._failure or error)
        log.info("migration_thread_exit", status=status.state.value)

    def _end_unsuccessfully(self, error: str | None) -> None:
        """Put unplugged devices back, take the storage back, restore the source's run state, then land in
        cancelled or failed."""
        self.unplugs.replug()
        try:
            self.machine.activate_block_nodes()
        except OSError as e:  # another process took the file meanwhile: the source cannot write it
            log.error("block_nodes_not_reactivated", error=str(e))
        c = self.counters
        c.end_ms = now_ms()
        if self._runstate_before is not None and self.machine.run.state is RunState.FINISH_MIGRATE:
            self.machine.run.set(self._runstate_before)
        if error is not None and c.in_postcopy:
            error += " (in postcopy: the destination already runs this machine, so the source stays stopped)"
        status = self.status
        while True:  # migrate_cancel may move the state under us: retry until one move lands (QEMU's cas)
            state = status.state
            if state is S.CANCELLING or error is None:
                if state is not S.CANCELLING and not status.cas(state, S.CANCELLING):
                    continue
                status.cas(S.CANCELLING, S.CANCELLED)
                log.info("migration_cancelled", failure=error)
                return
            self.ctx.set_error(error)  # before failed: whoever sees failed sees why
            if status.cas(state, S.FAILED):
                log.error("migration_failed", error=error)
                return

    def _cleanup(self) -> None:
        self.convergence.stop()
        for b in self._pinned:
            b.unlock()
        self._pinned.clear()
        if self._consumer is not None:
            self._consumer.close()
        for dev in self.machine.devices:
            dev.save_cleanup()
        dirty_bitmaps.release(self.device_state.bitmaps)
        if self.channel is not None:
            self.channel.abort("migration ended")
            if self._out is not None:
                self._out.close()
            self.channel.close()
        if self.multifd is not None:
            self.multifd.abort("migration ended")
            self.multifd.close()
        if self.return_path is not None:
            self.return_path.join(5)
        for b in self.machine.blocks:  # the channels are closed: nothing reads through these any more
            b.release_read_view()

    # -- setup -------------------------------------------------------------------------

    def _setup(self) -> None:
        c = self.counters
        if self.channel is None:  # transports that connect synchronously did it in migrate
            self.channel = self.transport.connect(self.addr, self.cancel_requested.is_set)
        self._check_cancel()
        t0 = now_ms()
        if self.ctx.parameter("mode") is MigMode.CPR_REBOOT:  # CPR modes stop the machine when they connect
            stop_for_switchover(self)
        if self.caps[C.MAPPED_RAM]:  # a file written at fixed offsets: every write goes straight out
            self.writer = StreamWriter(self.channel, self.machine.blocks)
        else:
            self._out = WriteBehind(self.channel)
            self.writer = StreamWriter(self._out, self.machine.blocks, self.caps[C.X_CHECKSUMS])
        self.writer.write_header(self.machine.uuid)
        self.writer.write_command(Command.CONFIG, {
            "validate-uuid": self.caps[C.VALIDATE_UUID],
            "mapped-ram": self.caps[C.MAPPED_RAM],
            "x-ignore-shared": self.caps[C.X_IGNORE_SHARED],
            # what the destination must map itself: the same file (checked by device and inode)
            "ignored-blocks": {b.name: b.file_identity() for b in self.machine.blocks if b.name in self.ignored},
            "postcopy-preempt": self.caps[C.POSTCOPY_PREEMPT] and self.caps[C.POSTCOPY_RAM],
            "switchover-ack": self.caps[C.SWITCHOVER_ACK],
            # QEMU's POSTCOPY_ADVISE, carried in CONFIG: the destination reads it before any page
            "postcopy-advise": postcopy_wire.advise(self.machine.blocks) if self.caps[C.POSTCOPY_RAM] else None,
            "x-colo": self.caps[C.X_COLO],
            "multifd": ({"channels": self.ctx.parameter("multifd-channels"),
                         "compression": str(self.ctx.parameter("multifd-compression"))}
                        if self.caps[C.MULTIFD] else None),
        })
        # postcopy always has a return path; COLO's replies and the secondary's output travel on it
        if self.caps[C.RETURN_PATH] or self.caps[C.POSTCOPY_RAM] or self.caps[C.X_COLO]:
            self.writer.write_command(Command.OPEN_RETURN_PATH)
            writer = self.writer
            self.return_path = SourceReturnPath(self.channel, lambda token: writer.write_command(Command.PING, token))
            self.return_path.start()  # its first PING's round trip feeds the downtime estimate
        if self.caps[C.MAPPED_RAM]:
            layout, section = mapped_ram.plan(self.machine.blocks, self.channel.tell())
            self.channel.send(section)
            self.channel.seek(layout.resume_offset)
            self.mapped = MappedRamWriter(layout, self.machine.blocks)
        if self.caps[C.MULTIFD]:
            # the destination gets the stream's CONFIG before any channel may fail: it then refuses a
            # mismatch with the reason, not with a stream cut short when this side gives up
            self._flush()
            self._start_multifd()
        self.unplugs.request()  # QEMU asks at setup's start and waits after the setup handlers ran
        for dev in self.machine.devices:
            if isinstance(dev, BlockDataDevice):
                dev.zero_blocks = self.caps[C.ZERO_BLOCKS]
            dev.save_setup()
        if self.caps[C.DIRTY_BITMAPS]:
            self.device_state.bitmaps = dirty_bitmaps.plan(self.machine, self.ctx.parameter("block-bitmap-mapping"))
        self._consumer = self.machine.tracker().consumer("migration", sends=True, skip=self.ignored)
        if self.multifd is not None:  # its proof that pages went unwritten lets channels compress in place
            self.multifd.witness = self._consumer.tracker
        self.pending = self._sync()
        if not (self.caps[C.MAPPED_RAM] or self.caps[C.POSTCOPY_RAM] or self.caps[C.BACKGROUND_SNAPSHOT]):
            # the destination reads what it holds in these while the stream loads, not after the last page
            holes = unpopulated(self.machine.blocks, self.pending, self.ignored)
            if holes:
                self.writer.write_command(Command.UNPOPULATED, encode_runs(holes))
                self._flush()  # now, not with the pass: multifd carries the pages and the main stream idles
        self._device_pending = self.device_state.sync()
        if self.caps[C.RDMA_PIN_ALL] and self.addr.tag.value == "rdma":
            self._pin_all()
        # never-populated pages are zero pages that cost nothing: counted as QEMU counts zero pages
        c.duplicate += sum(b.npages - len(self.pending[b.name]) for b in self.machine.blocks
                           if b.name not in self.ignored)
        self.unplugs.wait(self.status, self._check_cancel)
        c.setup_ms = now_ms() - t0
        self.convergence.start(c.transferred)
        if not (self.status.cas(S.SETUP, S.ACTIVE) or self.status.cas(S.WAIT_UNPLUG, S.ACTIVE)):
            self._check_cancel()
            raise MigrationFailed("migration status changed during setup")

    def _pin_all(self) -> None:
        """rdma-pin-all: RDMA registers (pins) all RAM up front; here every block is mlock'ed until the end,
        so no page of it is swapped out or migrated by the kernel while pages are sent (docs/differences.md)."""
        for b in self.machine.blocks:
            try:
                b.lock()
            except OSError as e:
                raise MigrationFailed(f"rdma-pin-all: {e.strerror}") from None
            self._pinned.append(b)
        log.info("ram_pinned", bytes=sum(b.size for b in self._pinned))

    def _start_multifd(self) -> None:
        """Connect multifd-channels more connections to the same address and start their threads."""
        self.multifd = connect_sender(self.ctx.parameters(), self.ctx.registry, self.transport, self.addr,
                                      self.cancel_requested.is_set, self.counters, self.machine.uuid,
                                      self.caps[C.ZERO_COPY_SEND], self.mapped, self.caps[C.X_CHECKSUMS])

    def _end_pass(self, running: bool) -> None:
        """Multifd: every page of this pass is on the wire, then the PASS marker on the main stream.

        Then the main stream's queued writes are flushed, so what the pass counted was really sent.
        """
        if self.multifd is not None:
            n = self.counters.dirty_sync_count
            self.multifd.sync(n, self._check_cancel)
            if self.mapped is None:
                self.writer.write_pass(n)
        self._flush()
        self._account(0, running)  # what the write-behind sent after the last batch counts in this pass

    def _flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def _account(self, pages: int, running: bool) -> None:
        """Count what the channel sent since the last call (page data, headers, commands alike)."""
        sent = self._ch.bytes_sent
        self.counters.sent(sent - self._accounted, pages, running)
        self._accounted = sent

    def _sync(self) -> dict[str, np.ndarray]:
        """One dirty-bitmap sync: a MIGRATION_PASS."""
        assert self._consumer is not None
        t0 = time.monotonic()
        report = self._consumer.collect()
        for name in self.ignored:  # the destination maps the same file: its pages never travel
            report.pages[name] = report.pages[name][:0]
        self._sync_ms = (time.monotonic() - t0) * 1000
        log.debug("dirty_sync", ms=round(self._sync_ms, 3), pages=report.total)
        self.counters.synced(report.total)
        if self.counters.dirty_sync_count > 1:
            self.convergence.on_sync(report.total, self.counters.transferred, self.counters.page_size)
        self.ctx.pass_completed(self.counters.dirty_sync_count, report.total * self.counters.page_size)
        return report.pages

    # -- passes ---------------------------------------------------------------------------

    def _ping(self, token: int) -> float:
        """PING the destination and wait for its PONG: everything sent before has been loaded then.

        Returns the milliseconds it took (0 without a return path).
        """
        if self.return_path is None:
            return 0.0
        return self.return_path.ping(token, self._check_cancel)

    def _switchover_bandwidth(self) -> float:
        """Bytes per ms the rest will go at: avail-switchover-bandwidth, else what the last dirty pass achieved.

        The first pass sends mostly contiguous RAM and is faster than sending scattered dirty pages, so
        its rate would promise too short a downtime; until a dirty pass was measured there is no
        estimate (0), and only an empty remainder switches over. A pass of a few pages measures mostly
        the round trip, so it stands in only until a pass of more than 1 MiB was measured: its rate is
        low, which keeps the promise safe, and a guest that dirties a page or two per pass still
        converges after the second pass instead of waiting for a pass that finds nothing dirty.
        """
        avail = self.ctx.parameter("avail-switchover-bandwidth")
        return avail / 1000 if avail else self._dirty_pass_bandwidth

    def _iterate(self) -> None:
        first = True
        while True:
            sent_before, t0 = self.counters.transferred, time.monotonic()
            self._send_all(self.pending, running=True)
            if self._unsent is not None:
                return  # migrate-start-postcopy: the rest of this pass goes in postcopy
            device_bytes, device_ms = self.device_state.send_pass(self.writer, self._check_cancel,
                                                                  lambda: self._account_and_pace(0, True))
            self._end_pass(running=True)
            # with a return path, a pass ends when the destination has loaded it: the rate measured is
            # then what the destination achieves, and no backlog is left in socket buffers at switchover
            self._ping(self.counters.dirty_sync_count)
            sent = self.counters.transferred - sent_before
            elapsed_ms = (time.monotonic() - t0) * 1000
            self.counters.passes.append(PassRecord(self.counters.dirty_sync_count, sent, device_bytes,
                                                   round(device_ms, 3), round(elapsed_ms, 3)))
            log.debug("pass_sent", number=self.counters.dirty_sync_count, bytes=sent, device_bytes=device_bytes,
                      device_iterate_ms=round(device_ms, 3), ms=round(elapsed_ms, 3))
            self.pending = self._sync()
            self._device_pending = self.device_state.sync()
            if first and self.caps[C.XBZRLE]:
                # after the first complete pass, pages sent again are encoded against what was sent before
                self.xbzrle.start(self.ctx.parameter("xbzrle-cache-size"))
            if self.xbzrle.active:
                self.xbzrle.period()
            if not first and sent and elapsed_ms > 0 and (sent > (1 << 20) or not self._dirty_pass_measured):
                self._dirty_pass_bandwidth = sent / elapsed_ms
                self._dirty_pass_measured = sent > (1 << 20)
            first = False
            if self._postcopy_due():
                self._unsent = self.pending
                return
            # still-dirty RAM and the devices' pending state (both halves: without postcopy all must go now)
            remaining = sum(len(p) * b.page_size for b, p in self._pending_blocks()) + self._device_pending
            bandwidth = self._switchover_bandwidth()
            # what a switchover costs besides sending: stopping, the last sync, the destination's answer
            rtt_ms = self.return_path.rtt_ms if self.return_path is not None else 0.0
            fixed_ms = self._sync_ms + rtt_ms + 1.0
            if bandwidth:
                self.counters.expected_downtime = int(remaining / bandwidth + fixed_ms)
            if remaining == 0 or remaining <= bandwidth * max(0.0, self.ctx.parameter("downtime-limit") - fixed_ms):
                if self._switchover_allowed(wait_s=0.1):
                    return
            self._check_cancel()

    def _switchover_allowed(self, wait_s: float = 0.0) -> bool:
        return switchover_allowed(self, wait_s)

    def _pending_blocks(self) -> list[tuple[RAMBlock, np.ndarray]]:
        return [(b, self.pending[b.name]) for b in self.machine.blocks]

    def _account_and_pace(self, pages: int, running: bool) -> None:
        account_and_pace(self, pages, running)

    def _send_all(self, pages: dict[str, np.ndarray], running: bool) -> None:
        send_pages(self, pages, running)

    def threads(self) -> list[threading.Thread]:
        """The threads of this migration (query-migrationthreads shows those alive)."""
        out = [self.thread] + ([self.return_path.thread] if self.return_path is not None else [])
        return out + (self.multifd.threads if self.multifd is not None else [])

    def stats(self) -> SourceStats:
        """What query-migrate shows of this migration now (its RAM, timing, xbzrle, compression, throttling)."""
        c, state = self.counters, self.status.state
        c.tick()
        s = SourceStats(setup_time=c.setup_ms or 0, total_time=c.total_time(), ram=c.to_stats(),
                        passes=list(c.passes))
        if state is S.COMPLETED or c.in_postcopy:
            s.downtime = c.downtime_ms if c.downtime_ms is not None else now_ms() - (c.downtime_start_ms or now_ms())
        else:
            s.expected_downtime = c.expected_downtime or self.ctx.parameter("downtime-limit")
        if self.caps[C.XBZRLE]:
            s.xbzrle_cache = self.xbzrle.stats(self.ctx.parameter("xbzrle-cache-size"))
        if self.multifd is not None and self.multifd.encoder_factory is not None:
            s.compression = self.multifd.compression.to_stats()  # mig's extension to query-migrate
        s.cpu_throttle_percentage = self.machine.vcpus.throttle_pct or None
        if self.device_state.has_vfio:
            s.vfio = VfioStats(transferred=self.device_state.vfio_bytes)
        limiter = self.ctx.dirty_limiter
        if self.convergence.mode == "dirty-limit" and self.convergence.dirty_limit_applied is not None \
                and limiter is not None:
            s.dirty_limit_throttle_time_per_round = limiter.throttle_time_per_round_us()
            s.dirty_limit_ring_full_time = limiter.ring_full_time_us()
        return s

    # -- completion ----------------------------------------------------------------------

    def _complete(self) -> None:
        complete_precopy(self)

    # -- COLO -------------------------------------------------------------------------

    def _colo(self) -> None:
        """x-colo: end the initial migration in ``colo`` and keep the destination in step (engine/colo)."""
        assert self.ctx.colo is not None
        primary = self.colo = ColoPrimary(self, self.ctx.colo)
        try:
            primary.complete_into_colo()
            primary.run()
        except CancelRequested:
            raise Cancelled() from None

    # -- postcopy ---------------------------------------------------------------------

    def _postcopy(self) -> None:
        """Switch to postcopy: the destination runs, the rest follows (engine/postcopy/source.py)."""
        run_postcopy(self)
