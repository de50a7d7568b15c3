"""The source's pages after the switch to postcopy (switch.py): background pages, requested pages first.

Every remaining page is sent once, in order, at most ``max-postcopy-bandwidth``
fast; a page the destination faulted on (REQ_PAGES on the return path) goes
before everything else, never throttled, with ``prefetch_pages`` pages after it,
and the background scan continues after it (its neighbours are likely next).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from mig_core.engine import dirty_bitmaps
from mig_core.engine.device_iteration import DeviceIteration
from mig_core.engine.return_path import Pong, RequestPages, SourceReturnPath
from mig_core.engine.stats import MigrationCounters, RateLimiter, now_ms
from mig_core.engine.write_behind import WriteBehind
from mig_core.errors import StreamError
from mig_core.ext.channel import Buffer, Channel
from mig_core.machine.machine import Machine
from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import is_zero_page, zero_mask
from mig_core.schema.migration import MigrationCapability
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.format import Command
from mig_core.stream.writer import StreamWriter

if TYPE_CHECKING:
    pass

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
    device_state: DeviceIteration
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
            if not is_zero_page(block.view[page * ps:(page + 1) * ps]):
                nbytes, zero = out.write_pages(block, pages), pages[:0]
            else:
                nbytes, zero, pages = out.write_zero_pages(block, pages), pages, pages[:0]
        else:
            is_zero = zero_mask(block.read_words, pages)
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
    devices = list(engine.machine.devices)
    sections = [engine.machine.devices.save(dev) for dev in devices]
    bitmaps = engine.device_state.bitmaps
    engine.writer.write_command(Command.PACKAGED, [token, len(sections) + (1 if bitmaps else 0)])
    for dev, section in zip(devices, sections, strict=True):
        engine.device_state.write_final(engine.writer, dev, section)
    if bitmaps:
        engine.writer.write_device(dirty_bitmaps.section(bitmaps))
    engine.machine.inactivate_block_nodes()  # the destination runs from here: its storage (back on failure)


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
