"""The source's side of postcopy: the switch, then background pages with requested pages first.

The switch (QEMU's postcopy_start, with mig's stream): end the multifd channels,
stop the machine, take the last dirty sync, name every page still to be sent in
POSTCOPY_RAM_DISCARD commands, send all device state in one package that the
destination reads whole, and move to ``postcopy-active``. Downtime ends when the
destination answers the package's PING: it loaded the devices and runs.

Then every remaining page is sent once, in order, at most ``max-postcopy-bandwidth``
fast; a page the destination faulted on (REQ_PAGES on the return path) goes
before everything else, never throttled, with ``prefetch_pages`` pages after it,
and the background scan continues after it (its neighbours are likely next).
"""

from __future__ import annotations

import collections
import functools
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from mig_core.engine.context import EngineContext, StatusCell
from mig_core.engine.multifd_send import MultifdSender
from mig_core.engine.postcopy.ipc import SWITCH_INTERVAL_S
from mig_core.engine.return_path import Pong, ReceivedBitmap, RequestPages, ResumeAck, SourceReturnPath
from mig_core.engine.stats import MigrationCounters, RateLimiter, now_ms
from mig_core.engine.write_behind import WriteBehind
from mig_core.errors import MigrationFailed, QMPError, StreamError
from mig_core.ext.channel import Buffer, Channel, ChannelError
from mig_core.machine.machine import Machine
from mig_core.memory.pagemap import pages_to_runs, union_pages
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import zero_mask
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.format import Command
from mig_core.stream.writer import StreamWriter

if TYPE_CHECKING:
    from mig_core.ext.transport import Transport
    from mig_core.schema.migration import MigrationAddress

log = structlog.get_logger("mig.postcopy.source")

#: Pages per background batch: small, so a requested page waits behind little (256 KiB of 4 KiB pages).
BACKGROUND_BATCH = 64
#: release-ram: background batches sent before the pages they carried are freed (the write-behind must
#: have written them first: freeing waits for it, so not after every batch)
RELEASE_EVERY = 64


class UrgentQueue:
    """Page requests from the return-path thread to the migration thread, which waits on it when idle."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: collections.deque[RequestPages] = collections.deque()

    def put(self, req: RequestPages) -> None:
        with self._cond:
            self._items.append(req)
            self._cond.notify()

    def drain(self) -> list[RequestPages]:
        with self._cond:
            out = list(self._items)
            self._items.clear()
            return out

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if a request comes."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


@functools.cache
def _zero_page(size: int) -> bytes:
    return bytes(size)


def check_request(req: RequestPages, blocks: dict[str, RAMBlock]) -> RAMBlock:
    """The block a page request names, refused with QEMU's texts when it is wrong."""
    block = blocks.get(req.block)
    if block is None:
        raise StreamError(f"MIG_RP_MSG_REQ_PAGES has no block '{req.block}'")
    ps = block.page_size
    if req.offset % ps or req.length % ps or not req.length:
        raise StreamError(f"MIG_RP_MSG_REQ_PAGES: Misaligned page request, start: {req.offset:x} len: {req.length:x}")
    if req.offset + req.length > block.size:
        raise StreamError(f"MIG_RP_MSG_REQ_PAGES request overrun, start={req.offset:x}, len={req.length:x}, "
                          f"blocklen={block.size:x}")
    return block


class SourceEngine(Protocol):
    """What the postcopy phase uses of the outgoing migration (its engine, seen narrowly)."""

    machine: Machine
    caps: dict[MigrationCapability, bool]
    writer: StreamWriter
    _out: WriteBehind | None
    counters: MigrationCounters
    limiter: RateLimiter
    return_path: SourceReturnPath | None

    def _flush(self) -> None: ...

    def _account(self, pages: int, running: bool) -> None: ...

    def _check_cancel(self) -> None: ...


class _Urgent:
    """A byte sink that writes ahead of the write-behind queue (requested pages without preempt)."""

    def __init__(self, out: WriteBehind) -> None:
        self.out = out

    def sendv(self, buffers: Sequence[Buffer]) -> None:
        self.out.send_now(buffers)

    def send(self, data: Buffer) -> None:
        self.out.send_now([data])


class SwitchingEngine(SourceEngine, Protocol):
    """The outgoing migration as the switch to postcopy drives it."""

    ctx: EngineContext
    transport: Transport
    addr: MigrationAddress
    channel: Channel | None
    cancel_requested: threading.Event
    resume_requests: queue.Queue[tuple[Transport, MigrationAddress]]
    status: StatusCell
    multifd: MultifdSender | None
    postcopy: PostcopySender | None
    _unsent: dict[str, np.ndarray] | None
    _runstate_before: RunState | None

    @property
    def _ch(self) -> Channel: ...

    def _stop_for_switchover(self) -> None: ...

    def _sync(self) -> dict[str, np.ndarray]: ...

    def _end_pass(self, running: bool) -> None: ...

    def use_connection(self, channel: Channel) -> None: ...


class PostcopySender:
    """Sends the pages left at the switch; requested pages first."""

    def __init__(self, engine: SourceEngine, coming: dict[str, np.ndarray], limit: Callable[[], int],
                 prefetch_pages: int = 0) -> None:
        self.engine = engine
        self.blocks = list(engine.machine.blocks)
        self.by_name = {b.name: b for b in self.blocks}
        self.coming = {b.name: self._mask(b, coming[b.name]) for b in self.blocks}
        self.to_send = {b.name: m.copy() for b, m in zip(self.blocks, self.coming.values(), strict=True)}
        self.left = sum(int(m.sum()) for m in self.to_send.values())
        self.limit = limit
        self.prefetch = prefetch_pages
        self.urgent = UrgentQueue()
        self._cursor = (0, 0)
        self.requests = 0
        #: pages sent after requested ones (``prefetch_pages``)
        self.prefetched = 0
        #: guards the masks, the cursor and the counts: with preempt, requests are served on the
        #: return-path thread while the migration thread sends the background
        self._lock = threading.Lock()
        #: the postcopy-preempt connection's writer (None without preempt, or once it was closed)
        self.preempt: StreamWriter | None = None
        self.preempt_channel: Channel | None = None
        self._preempt_lock = threading.Lock()
        #: without preempt: requested pages written by the return-path thread ahead of the queued background
        self.direct: StreamWriter | None = None
        self.finished = False
        #: release-ram: free source pages once sent (the same host's destination holds them then)
        self.release = bool(engine.caps[MigrationCapability.RELEASE_RAM])
        self._unreleased: list[tuple[RAMBlock, np.ndarray]] = []
        self.released_pages = 0

    @staticmethod
    def _mask(block: RAMBlock, pages: np.ndarray) -> np.ndarray:
        mask = np.zeros(block.npages, dtype=bool)
        mask[pages] = True
        return mask

    def on_request(self, req: RequestPages) -> None:
        """Return-path thread: a page request (checked here; a wrong one ends the migration).

        With postcopy-preempt the page goes out right here, on its own connection, overtaking whatever
        the background stream has queued; without, the migration thread sends it before its next batch.
        """
        check_request(req, self.by_name)
        if self.preempt is not None or self.direct is not None:
            self._serve(req)
        else:
            self.urgent.put(req)

    def use_main(self) -> None:
        """Write requested pages on the main connection straight from the return-path thread (no preempt)."""
        out = self.engine._out
        self.direct = StreamWriter(_Urgent(out), self.blocks) if out is not None else None

    def finish(self) -> None:
        """Nothing more goes out on the main connection but its end: requests are pages already sent."""
        with self._preempt_lock:
            self.finished = True
            self.direct = None

    def use_preempt(self, channel: Channel, source_uuid: str) -> None:
        """Send requested pages on ``channel`` from now on (its header goes first)."""
        channel.send(postcopy_wire.preempt_header(source_uuid))
        with self._preempt_lock:
            self.preempt_channel = channel
            self.preempt = StreamWriter(channel, self.blocks)

    def close_preempt(self, end: bool) -> None:
        """Stop using the preempt connection (``end``: tell the destination it is finished first)."""
        with self._preempt_lock:
            writer, channel = self.preempt, self.preempt_channel
            self.preempt = self.preempt_channel = None
            if writer is not None and end:
                writer.write_end()
        if channel is not None:
            if not end:
                channel.abort("postcopy paused")
            channel.close()

    def reload(self, received: dict[str, np.ndarray]) -> None:
        """After a recovery: send again every page that was coming and the destination does not hold."""
        with self._lock:
            for b in self.blocks:
                self.to_send[b.name] = self.coming[b.name] & ~received[b.name]
            self.left = sum(int(m.sum()) for m in self.to_send.values())
        self.urgent.drain()  # the destination asks again for what it still waits for
        self.engine.counters.remaining = self.remaining_bytes()
        log.info("postcopy_bitmaps_reloaded", pages_left=self.left)

    def remaining_bytes(self) -> int:
        return sum(int(self.to_send[b.name].sum()) * b.page_size for b in self.blocks)

    def run(self) -> None:
        """Send every page left; returns when the last one is written."""
        e = self.engine
        while self.left:
            e._check_cancel()
            for req in self.urgent.drain():
                self._serve(req)
            with self._lock:
                found = self._next_batch() if self.left else None
                if found is not None:
                    self._take(*found)
            if found is None:
                break
            block, pages = found
            nbytes = self._send(block, pages, None)
            if self.release:
                self._unreleased.append((block, pages))
                if len(self._unreleased) >= RELEASE_EVERY:
                    self.release_sent()
            e.limiter.set_limit(self.limit())
            delay = e.limiter.wait_time(nbytes)
            if delay:
                self.urgent.wait(delay)  # a request is served at once: only background pages are throttled
        e._flush()
        e._account(0, False)
        if self.release:
            self.release_sent()

    def release_sent(self) -> None:
        """release-ram: free the pages the main stream has sent (after the write-behind wrote them)."""
        self.engine._flush()
        pending, self._unreleased = self._unreleased, []
        for block, pages in pending:
            self._release(block, pages)

    def _release(self, block: RAMBlock, pages: np.ndarray) -> None:
        block.discard_runs(*pages_to_runs(np.sort(pages)))
        self.released_pages += len(pages)

    def release_migrated(self) -> None:
        """release-ram at the switch: free every page that is not still to be sent (precopy sent them)."""
        for b in self.blocks:
            done = np.flatnonzero(~self.coming[b.name])
            if len(done):
                self._release(b, done)
        log.info("release_ram", pages=self.released_pages)

    def _serve(self, req: RequestPages) -> None:
        block = self.by_name[req.block]
        ps = block.page_size
        first = req.offset // ps
        last = min(block.npages, (req.offset + req.length) // ps + self.prefetch)
        with self._lock:
            self.requests += 1
            self.engine.counters.postcopy_requests += 1
            mask = self.to_send[block.name]
            if last - first == 1:  # one page (no prefetch): no array search
                if not mask[first]:
                    return  # already sent: it is on its way
                pages = np.array([first])
            else:
                pages = first + np.flatnonzero(mask[first:last])
            if not len(pages):
                return
            self._take(block, pages)
            self.prefetched += len(pages) - int(pages[0] == first)  # beyond the requested page itself
            self._cursor = (self.blocks.index(block), int(pages[-1]) + 1)  # its neighbours are likely next
        with self._preempt_lock:
            direct = self.preempt if self.preempt is not None else self.direct
            if direct is not None:
                # written when this returns (free to release); main-connection bytes are counted by the
                # migration thread with the rest of that connection's
                self._send(block, pages, direct, count=direct is self.preempt)
                if self.release:
                    self._release(block, pages)
                return
            if self.finished:
                return
        self._send(block, pages, None)
        self.engine._flush()  # a requested page waits behind nothing of this process
        if self.release:
            self._release(block, pages)

    def _next_batch(self) -> tuple[RAMBlock, np.ndarray] | None:
        """Up to BACKGROUND_BATCH unsent pages from the cursor on, wrapping around the blocks."""
        bi, start = self._cursor
        for step in range(len(self.blocks) + 1):
            b = self.blocks[(bi + step) % len(self.blocks)]
            mask = self.to_send[b.name]
            lo = start if step == 0 else 0
            window = 1 << 16
            while lo < b.npages:
                hits = np.flatnonzero(mask[lo:lo + window])
                if len(hits):
                    pages = lo + hits[:BACKGROUND_BATCH]
                    self._cursor = ((bi + step) % len(self.blocks), int(pages[-1]) + 1)
                    return b, pages
                lo += window
        return None

    def _take(self, block: RAMBlock, pages: np.ndarray) -> None:
        """Mark ``pages`` sent (under the lock): whoever took them sends them."""
        self.to_send[block.name][pages] = False
        self.left -= len(pages)
        self.engine.counters.remaining = max(0, self.engine.counters.remaining - len(pages) * block.page_size)

    def _send(self, block: RAMBlock, pages: np.ndarray, writer: StreamWriter | None, count: bool = True) -> int:
        """Send pages (zero ones as zero): on the main stream (``writer`` None) or the preempt connection."""
        e, c = self.engine, self.engine.counters
        out = writer if writer is not None else e.writer
        nbytes = 0
        if len(pages) == 1:  # a requested page: one zero test, one section, no array work
            page = int(pages[0])
            ps = block.page_size
            if block.view[page * ps:(page + 1) * ps].tobytes() != _zero_page(ps):  # memcmp: ~0.3 µs
                nbytes, zero = out.write_page(block, page), pages[:0]
            else:
                nbytes, zero, pages = out.write_zero_pages(block, pages), pages, pages[:0]
        else:
            is_zero = zero_mask(block.words, pages)
            zero = pages[is_zero]
            if len(zero):
                nbytes += out.write_zero_pages(block, zero)
                pages = pages[~is_zero]
            if len(pages):
                nbytes += out.write_pages(block, pages)
        with self._lock:
            c.duplicate += len(zero)
            c.normal += len(pages)
        if writer is None:
            e._account(len(pages), False)
        elif count:
            c.sent(nbytes, len(pages), False)
        return nbytes


def send_package(engine: SourceEngine, token: int) -> None:
    """PACKAGED and every device's state after it (the destination reads them whole, then runs)."""
    devices = engine.machine.devices
    sections = [devices.save(dev) for dev in devices]
    engine.writer.write_command(Command.PACKAGED, [token, len(sections)])
    for section in sections:
        engine.writer.write_device(section)


def send_discards(engine: SourceEngine, coming: dict[str, np.ndarray]) -> None:
    """POSTCOPY_RAM_DISCARD for every block: the pages the destination must not keep from before."""
    for b in engine.machine.blocks:
        for arg in postcopy_wire.discard_commands(b, coming[b.name]):
            engine.writer.write_command(Command.POSTCOPY_RAM_DISCARD, arg)


def watch_downtime(rp: SourceReturnPath, token: int, counters: MigrationCounters) -> None:
    """Downtime ends when the destination answers the package's PING (it loaded the devices and runs)."""

    def on_pong(msg: Pong) -> None:
        if msg.token == token and counters.downtime_ms is None and counters.downtime_start_ms is not None:
            counters.downtime_ms = now_ms() - counters.downtime_start_ms
            log.info("postcopy_destination_running", downtime_ms=counters.downtime_ms)

    rp.on_pong = on_pong


def _recoverable(engine: SwitchingEngine, e: Exception) -> bool:
    """A broken connection pauses; the destination's own failure, a cancel or a bug does not."""
    if engine.cancel_requested.is_set():
        return False
    if isinstance(e, ChannelError):
        return True
    rp = engine.return_path
    return isinstance(e, MigrationFailed) and rp is not None and rp.broken


def run_postcopy(engine: SwitchingEngine) -> None:
    """Switch to postcopy, send the rest, complete when the destination confirms the last page arrived."""
    c, run, status = engine.counters, engine.machine.run, engine.status
    assert engine._unsent is not None and engine.return_path is not None
    engine._stop_for_switchover()
    final = engine._sync()
    coming = {b.name: union_pages(engine._unsent[b.name], final[b.name], b.npages) for b in engine.machine.blocks}
    if engine.multifd is not None:  # the destination places everything they carried before it runs
        engine._end_pass(running=False)
        engine.multifd.finish()
    send_discards(engine, coming)
    token = c.dirty_sync_count + 1  # above every pass's PING token
    watch_downtime(engine.return_path, token, c)
    sender = engine.postcopy = PostcopySender(engine, coming, lambda: engine.ctx.parameter("max-postcopy-bandwidth"),
                                              engine.ctx.postcopy_prefetch_pages)
    engine.return_path.on_request = sender.on_request
    if engine.caps[MigrationCapability.POSTCOPY_PREEMPT]:  # the destination accepts it before it runs
        sender.use_preempt(engine.transport.connect_extra(engine.addr, engine.cancel_requested.is_set, False),
                           engine.machine.uuid)
    send_package(engine, token)
    engine._flush()
    engine._account(0, running=False)
    if sender.preempt is None:
        sender.use_main()
    c.in_postcopy = True
    engine._runstate_before = None  # the destination may run from now on: a failure never resumes here
    if sender.release:
        sender.release_migrated()
    if not status.cas(S.DEVICE, S.POSTCOPY_ACTIVE):
        engine._check_cancel()
    c.remaining = sender.remaining_bytes()
    log.info("postcopy_started", pages=sender.left, ms_since_stop=now_ms() - (c.downtime_start_ms or 0))
    # a page request waits for the GIL behind whatever thread holds it: up to the switch interval (5 ms
    # by default); a short one keeps fault latency low while the source has nothing else to run
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
    try:
        _send_rest(engine, sender)
    finally:
        sys.setswitchinterval(interval)
    c.finish()
    if not status.cas(S.POSTCOPY_ACTIVE, S.COMPLETED):
        engine._check_cancel()
    run.set(RunState.POSTMIGRATE)
    log.info("migration_completed", total_ms=c.total_time(), downtime_ms=c.downtime_ms,
             transferred=c.transferred, postcopy_requests=c.postcopy_requests, prefetched_pages=sender.prefetched)


def _send_rest(engine: SwitchingEngine, sender: PostcopySender) -> None:
    """Background and requested pages until the destination confirms the end; pauses on a broken connection."""
    while True:
        try:
            sender.run()
            sender.finish()
            sender.close_preempt(end=True)
            engine.writer.write_end()
            engine._flush()
            engine._ch.finish()
            engine._account(0, running=False)
            rp = engine.return_path
            assert rp is not None
            rp.await_end(engine._check_cancel)
            break
        except (ChannelError, MigrationFailed) as e:
            if not _recoverable(engine, e):
                raise
            _pause_until_recovered(engine, sender, str(e))


#: How long a recovery's destination may take to answer the handshake before the source pauses again.
HANDSHAKE_TIMEOUT_S = 30.0


def _pause_until_recovered(engine: SwitchingEngine, sender: PostcopySender, error: str) -> None:
    """postcopy-paused until ``migrate resume=true`` connects and the handshake completes (then active)."""
    status = engine.status
    if sender.release:
        engine.ctx.set_error(f"postcopy: the connection to the destination broke ({error}); with release-ram this "
                             "source freed the pages it had sent, so it cannot resume the migration")
    else:
        engine.ctx.set_error(f"postcopy: the connection to the destination broke ({error}); it can resume only to "
                             "the same destination process (migrate-recover there, then migrate with resume): a "
                             "destination that died took the machine's state and the pages it had received with it")
    status.cas(status.state, S.POSTCOPY_PAUSED)
    log.warning("postcopy_paused", error=error, msg="Detected IO failure for postcopy. Migration paused.")
    sender.close_preempt(end=False)
    sender.direct = None  # its connection is gone; the recovery writes on the new one
    _drop_connection(engine)
    while True:
        transport, addr = _next_resume(engine)
        status.cas(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP)
        try:
            channel = transport.connect(addr, engine.cancel_requested.is_set)
        except (QMPError, ChannelError, OSError) as e:
            text = e.desc if isinstance(e, QMPError) else str(e)
            log.warning("postcopy_recover_connect_failed", error=text)
            engine.ctx.set_error(text)
            status.cas(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED)
            continue
        status.cas(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER)
        try:
            _handshake(engine, sender, channel, transport, addr)
        except (ChannelError, StreamError, MigrationFailed, TimeoutError, QMPError) as e:
            log.warning("postcopy_recover_failed", error=e.desc if isinstance(e, QMPError) else str(e))
            sender.close_preempt(end=False)
            _drop_connection(engine)
            status.cas(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)
            continue
        status.cas(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
        log.info("postcopy_recovered", pages_left=sender.left)
        return


def _next_resume(engine: SwitchingEngine) -> tuple[Transport, MigrationAddress]:
    while True:
        if engine.cancel_requested.is_set():
            raise MigrationFailed("the paused postcopy migration was abandoned")
        try:
            return engine.resume_requests.get(timeout=0.2)
        except queue.Empty:
            continue


def _drop_connection(engine: SwitchingEngine) -> None:
    """Close the broken connection and end its return-path thread (the pages sender keeps its state)."""
    ch, rp = engine.channel, engine.return_path
    if ch is not None:
        ch.abort("postcopy paused")
    if rp is not None:
        rp.wake()
        rp.join(5)
    if ch is not None:
        ch.close()


def _handshake(engine: SwitchingEngine, sender: PostcopySender, channel: Channel, transport: Transport,
               addr: MigrationAddress) -> None:
    """On the new connection: header, RECV_BITMAP per block, POSTCOPY_RESUME; RESUME_ACK ends it."""
    engine.use_connection(channel)
    writer = engine.writer
    writer.write_header(engine.machine.uuid)
    bitmaps: dict[str, np.ndarray] = {}
    acked = threading.Event()
    cond = threading.Condition()

    def on_recovery(msg: ReceivedBitmap | ResumeAck) -> None:
        with cond:
            if isinstance(msg, ResumeAck):
                if msg.value != 1:
                    raise StreamError(f"illegal resume_ack value {msg.value}")
                acked.set()
            else:
                block = sender.by_name.get(msg.block)
                if block is None:
                    raise StreamError(f"RECV_BITMAP for an unknown RAM block '{msg.block}'")
                expected = (block.npages + 7) // 8
                if len(msg.bitmap) != expected:
                    raise StreamError(f"ramblock '{msg.block}' bitmap size mismatch (0x{len(msg.bitmap):x} != "
                                      f"0x{expected:x})")
                bitmaps[msg.block] = np.unpackbits(np.frombuffer(msg.bitmap, np.uint8), count=block.npages
                                                   ).astype(bool)
            cond.notify_all()

    rp = SourceReturnPath(channel, lambda token: writer.write_command(Command.PING, token))
    rp.on_recovery = on_recovery
    engine.return_path = rp
    rp.start(ping=False)
    for b in engine.machine.blocks:
        writer.write_command(Command.POSTCOPY_RECV_BITMAP, b.name)
    engine._flush()
    _wait(cond, lambda: len(bitmaps) == len(sender.blocks), rp, engine)
    sender.reload(bitmaps)
    if engine.caps[MigrationCapability.POSTCOPY_PREEMPT]:  # a new preempt connection before the resume
        sender.use_preempt(transport.connect_extra(addr, engine.cancel_requested.is_set, False), engine.machine.uuid)
    if sender.preempt is None:
        sender.use_main()
    rp.on_request = sender.on_request
    writer.write_command(Command.POSTCOPY_RESUME)
    engine._flush()
    _wait(cond, acked.is_set, rp, engine)


def _wait(cond: threading.Condition, done: Callable[[], bool], rp: SourceReturnPath, engine: SwitchingEngine) -> None:
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    with cond:
        while not done():
            failure = rp.failure()
            if failure is not None or engine.cancel_requested.is_set():
                raise MigrationFailed(failure or "cancelled")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the destination did not answer the recovery within {HANDSHAKE_TIMEOUT_S:g} s")
            cond.wait(0.1)
