"""Multifd on the source: page jobs fanned out to channel threads, a sync at the end of every pass.

The migration thread queues jobs (one block's pages) and tests their pages for
zeros while the channels write earlier jobs; the first idle channel thread takes
each job, compresses its non-zero pages when a compressor is chosen and writes
one packet. numpy's page tests, the
compressors and ``sendmsg`` all release the GIL, so channels really run in
parallel. ``sync`` waits until every queued job is on the wire, then writes a
SYNC packet on every channel: the destination applies nothing of the next
pass before all of this one has landed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from mig_core.engine.stats import MigrationCounters
from mig_core.ext import compressor
from mig_core.ext.channel import Channel, ChannelError
from mig_core.ext.compressor import Encoder
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import zero_mask, zero_rows
from mig_core.schema.migration import CompressionStats
from mig_core.stream.checksum import FLAG_CHECKSUMS, page_hashes, trailer
from mig_core.stream.mapped_ram import MappedRamWriter
from mig_core.stream.multifd import PacketFlag, init_packet, pack_header
from mig_core.stream.writer import page_buffers

if TYPE_CHECKING:
    from mig_core.ext.dirty_tracker import DirtyTracker
    from mig_core.ext.transport import Transport
    from mig_core.plugin.registry import PluginRegistry
    from mig_core.schema.migration import MigrationAddress

log = structlog.get_logger("mig.multifd")

#: Pages of a packet an independent encoder probes before it compresses the packet, and the share they must
#: shrink by for the packet to be compressed (incompressible data: zstd would store it and deflate grow it,
#: each after spending the CPU; measured for issue 21 on random data).
PROBE_PAGES = 8
PROBE_GAIN = 1 / 32
#: A channel whose last job compressed to this share or less compresses the next without a probe (the probe
#: gathers pages from across the job and starts a frame of its own: 0.018 CPU-s per GiB alone, 0.031 in a
#: migration, 10 % of a channel's work on text-like data; measured for issue 21). A job that does not compress
#: after all goes out as it is, packet by packet, and the channel probes again from the next job on.
TRUST_RATIO = 0.5


def _l2_cache_bytes() -> int:
    """The first CPU's level-2 cache (Linux sysfs, e.g. ``1024K``); 1 MiB where that cannot be read."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return 1 << 20


_L2 = _l2_cache_bytes()


def packet_pages(page_size: int, ratio: float) -> int:
    """Pages per compressed packet (16 to 4096): as many as compress, at ``ratio``, to one level-2 cache.

    The compressed output is then still in this core's cache when the kernel copies it to the socket, and
    on the destination the received packet still is when it is decoded; data that compresses well goes
    in the largest packets, which cost least per page. Measured for issue 21 with a 1 MiB L2 (2 channels +
    zstd, 1 GiB random, every packet compressed): 0.38 s with 1 MiB packets, 0.42-0.45 s with 512 KiB,
    0.46-0.49 s with 2 MiB, 0.49-0.55 s with 4 MiB; on text-like data the largest packets were fastest
    (16 MiB jobs, 2 channels + zstd: 0.246-0.261 s in 16 MiB packets, 0.262-0.267 s in 8 MiB)."""
    return max(16, min(4096, int(_L2 / (page_size * max(ratio, 1 / 4096)))))


@dataclass
class _Job:
    block_index: int
    block: RAMBlock
    pages: np.ndarray
    data: np.ndarray | None
    pass_number: int
    number: int
    #: which pages are zero (the migration thread's test, made while channels were busy); None: not tested
    is_zero: np.ndarray | None = None


@dataclass
class CompressionCounters:
    """query-migrate's ``compression`` with the meaning QEMU gives it (its compression threads' counters).

    ``pages``: pages sent through the compressor (a packet the probe or the size check sent as it is counts
    with its own size, as a stored block would); ``compressed-size``: their bytes after compression;
    ``busy``: pages queued while every channel was busy (mig's migration thread then waits; QEMU's, with
    compress-wait-thread off, sends such pages uncompressed). Per period, from one dirty sync to the next
    as in QEMU: ``busy-rate`` = busy pages / all pages queued (zero pages too), ``compression-rate`` = the
    period's pages × page size / its compressed bytes, left as it was by a period that compressed nothing.
    """

    page_size: int = 4096
    pages: int = 0
    busy: int = 0
    compressed_size: int = 0
    busy_rate: float = 0.0
    compression_rate: float = 0.0
    _queued: int = 0  # pages queued since the last period
    _busy_prev: int = 0
    _pages_prev: int = 0
    _size_prev: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def compressed(self, pages: int, size: int) -> None:
        with self._lock:
            self.pages += pages
            self.compressed_size += size

    def queued(self, pages: int, busy: bool) -> None:
        with self._lock:
            self._queued += pages
            if busy:
                self.busy += pages

    def period(self) -> None:
        """End a period (QEMU updates its rates at every dirty sync)."""
        with self._lock:
            if not self._queued:
                return
            self.busy_rate = (self.busy - self._busy_prev) / self._queued
            self._busy_prev, self._queued = self.busy, 0
            size = self.compressed_size - self._size_prev
            if size:
                self.compression_rate = (self.pages - self._pages_prev) * self.page_size / size
                self._pages_prev, self._size_prev = self.pages, self.compressed_size

    def to_stats(self) -> CompressionStats:
        with self._lock:
            return CompressionStats(pages=self.pages, busy=self.busy, busy_rate=round(self.busy_rate, 4),
                                    compressed_size=self.compressed_size,
                                    compression_rate=round(self.compression_rate, 4))


@dataclass
class InPlaceCounts:
    """What became of the compressed packets of live RAM (``MultifdSender._compress``)."""

    kept: int = 0
    redone: int = 0
    copied: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kept: int = 0, redone: int = 0, copied: int = 0) -> None:
        with self._lock:
            self.kept += kept
            self.redone += redone
            self.copied += copied


class MultifdSender:
    """N channel threads writing page packets; the migration thread queues jobs and syncs."""

    def __init__(self, channels: Sequence[Channel], source_uuid: str, counters: MigrationCounters,
                 encoder_factory: Callable[[], Encoder] | None, detect_zero: bool, zero_copy: bool,
                 mapped: MappedRamWriter | None = None, checksums: bool = False) -> None:
        self.channels = list(channels)
        #: x-checksums: each packet's framing and each of its pages carry an xxh3-64
        self.checksums = checksums
        self.uuid = source_uuid
        self.counters = counters
        self.compression = CompressionCounters(counters.page_size)
        self.encoder_factory = encoder_factory
        self.detect_zero = detect_zero
        self.zero_copy = zero_copy
        #: mapped-ram: pages go to their fixed file offsets; no packets, and syncs are local
        self.mapped = mapped
        self.error: str | None = None
        #: the dirty tracker whose proof that a packet's pages went unwritten lets a channel compress live RAM
        #: in place (``Encoder.compress_parts_stable``); None: live RAM is always compressed from a copy
        self.witness: DirtyTracker | None = None
        #: packets of live RAM compressed in place and kept; compressed in place, then again from a copy
        #: because a page was written meanwhile; compressed from a copy at once (written since the harvest)
        self.in_place = InPlaceCounts()
        # two jobs per channel: a thread finishing one finds the next waiting (no hand-off bubble)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=2 * len(self.channels))
        self._outstanding = 0
        self._cond = threading.Condition()
        self._number = 0
        self.threads = [threading.Thread(target=self._thread, args=(i,), name=f"mig/src/send_{i}", daemon=True)
                         for i in range(len(self.channels))]

    # -- migration thread -----------------------------------------------------------

    def start(self) -> None:
        """Write each channel's init packet and start the channel threads."""
        n = len(self.channels)
        for i, ch in enumerate(self.channels):
            if self.mapped is not None:
                continue
            if self.zero_copy:
                ch.enable_zero_copy()
            ch.sendv([init_packet(i, n, self.uuid, FLAG_CHECKSUMS if self.checksums else 0)])
            self.counters.multifd_sent(ch.bytes_sent, 0, 0)
        for t in self.threads:
            t.start()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise ChannelError(self.error)

    def send(self, block_index: int, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None,
             pass_number: int, should_stop: Callable[[], None]) -> None:
        """Queue one block's pages (``data``: a snapshot to send instead of RAM); waits while all are busy.

        The zero test runs here, in the caller's thread, so it overlaps the channels' writes. (Testing
        in the channel that compresses the pages was tried for issue 21: it costs the same there, 29-35 ms
        per GiB of first lines fetched from memory, and no longer overlaps.)
        """
        self._number += 1
        is_zero = self._zero_test(block, pages, data)
        job = _Job(block_index, block, pages, data, pass_number, self._number, is_zero)
        with self._cond:
            self._outstanding += 1
        busy = self._jobs.full()
        self.compression.queued(len(pages), busy)
        while True:
            self._raise_if_failed()
            should_stop()
            try:
                self._jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def _zero_test(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> np.ndarray | None:
        if not self.detect_zero:
            return None
        if data is None:
            return zero_mask(block.read_words, pages)
        return zero_rows(data.reshape(len(pages), -1).view(np.uint64))

    def sync(self, pass_number: int, should_stop: Callable[[], None]) -> None:
        """Wait until every queued page is written, then end the pass with a SYNC packet on every channel."""
        with self._cond:
            while self._outstanding and self.error is None:
                self._cond.wait(0.1)
                should_stop()
        self._raise_if_failed()
        if self.mapped is not None:
            return
        # the channel threads are idle now: this thread may write to their channels
        missed = False
        for ch in self.channels:
            before = ch.bytes_sent
            self._send_end(ch, pack_header(PacketFlag.SYNC, pass_number, 0, 0, 0, 0, 0))
            if self.zero_copy:
                missed |= ch.flush_zero_copy()
            self.counters.multifd_sent(ch.bytes_sent - before, 0, 0)
        if missed:
            self.counters.zero_copy_missed()
        self.compression.period()

    def finish(self) -> None:
        """After the last sync: a FIN packet on every channel, then the threads end."""
        for ch in self.channels:
            before = ch.bytes_sent
            if self.mapped is None:
                self._send_end(ch, pack_header(PacketFlag.FIN, 0, 0, 0, 0, 0, 0))
            ch.finish()
            self.counters.multifd_sent(ch.bytes_sent - before, 0, 0)
        self.stop()
        if self.encoder_factory is not None:
            c = self.in_place
            log.info("multifd_in_place", kept=c.kept, redone=c.redone, copied=c.copied)

    def stop(self) -> None:
        """End the channel threads (they finish or fail their current job first)."""
        for _ in self.threads:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                break
        for t in self.threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(5)

    def abort(self, reason: str) -> None:
        for ch in self.channels:
            ch.abort(reason)
        while True:  # unblock a thread waiting for work, drop what is queued
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self.stop()

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    # -- channel threads ----------------------------------------------------------------

    def _thread(self, i: int) -> None:
        ch = self.channels[i]
        encoder = self.encoder_factory() if self.encoder_factory is not None else None
        ratio = 1.0  # what this channel's last compressed job came to (1.0: none yet, or it did not compress)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self.error is None:
                    ratio = self._send_job(ch, encoder, job, ratio)
            except (ChannelError, OSError, ValueError) as e:
                with self._cond:
                    if self.error is None:
                        self.error = f"multifd channel {i}: {e}"
                        log.error("multifd_send_failed", channel=i, error=str(e))
            finally:
                with self._cond:
                    self._outstanding -= 1
                    self._cond.notify_all()

    def _send_job(self, ch: Channel, encoder: Encoder | None, job: _Job, last_ratio: float) -> float:
        """Send one job; returns what a compressed job came to (``last_ratio`` as it was otherwise)."""
        b, pages, data = job.block, job.pages, job.data
        zero = pages[:0]
        is_zero = job.is_zero
        if is_zero is not None:
            if is_zero.any():
                zero = pages[is_zero]
                pages = pages[~is_zero]
                if data is not None:
                    data = data[~is_zero]
        if self.mapped is not None:
            if len(zero):
                self.mapped.zero(b, zero)
            n = self.mapped.write(ch, b, pages, data) if len(pages) else 0
            self.counters.multifd_sent(n, len(pages), len(zero))
            return last_ratio
        if encoder is not None and len(pages):
            return self._send_compressed(ch, encoder, job, pages, data, zero, last_ratio)
        if len(pages):
            self._send_raw(ch, job, pages, data, zero)
        else:
            self._send_packet(ch, job, 0, pages, zero, [])
        return last_ratio

    def _send_compressed(self, ch: Channel, encoder: Encoder, job: _Job, pages: np.ndarray,
                         data: np.ndarray | None, zero: np.ndarray, last_ratio: float = 1.0) -> float:
        """The job's pages in packets whose compressed form fits this core's level-2 cache, compressed
        where that makes them smaller; returns the share the job came to (``last_ratio`` for the next).

        An encoder whose packets decode on their own (``Encoder.independent``) first gets a probe of
        the job (``PROBE_PAGES`` pages spread across it), unless the channel's last job came to
        ``TRUST_RATIO`` or less: if the probe does not shrink by ``PROBE_GAIN``, the job goes out as one
        uncompressed packet, as without a compressor (the destination receives it straight into RAM;
        neither side copies or codes it). The probe's ratio, or the last job's, sizes the packets
        (``packet_pages``). A packet that compression would not shrink goes out as it is, too.
        """
        b, ps = job.block, job.block.page_size
        ratio = 1.0
        if encoder.independent:
            if last_ratio <= TRUST_RATIO:
                ratio = last_ratio
            else:
                ratio = (_probe(encoder, data, np.arange(len(pages))) if data is not None
                         else _probe(encoder, b.read_pages, pages))
                if ratio > 1 - PROBE_GAIN:
                    self.compression.compressed(len(pages), self._send_raw(ch, job, pages, data, zero))
                    return 1.0
        step = packet_pages(ps, ratio)
        total = 0
        for i in range(0, len(pages), step):
            part, part_data = pages[i:i + step], data[i:i + step] if data is not None else None
            part_zero = zero if i == 0 else zero[:0]
            # one contiguous buffer: a view of live RAM for a single run, else a private copy
            live = part_data is None and int(part[-1]) - int(part[0]) + 1 == len(part)
            if part_data is not None:
                raw: np.ndarray | memoryview = part_data
            elif live:
                raw = b.read_view[int(part[0]) * ps:(int(part[-1]) + 1) * ps]
            else:
                raw = b.read_pages[part]  # numpy's gather: one copy, no per-page work
            payload = self._compress(encoder, b, part, np.ascontiguousarray(raw).data.cast("B"), live)
            if encoder.independent and _nbytes(payload) >= len(part) * ps:
                size = self._send_raw(ch, job, part, part_data, part_zero)
            else:
                hashes = page_hashes(b, part, np.asarray(raw).reshape(len(part), ps)) if self.checksums else None
                size = self._send_packet(ch, job, PacketFlag.COMPRESSED, part, part_zero, payload, hashes)
            self.compression.compressed(len(part), size)
            total += size
        return total / (len(pages) * ps)

    def _compress(self, encoder: Encoder, block: RAMBlock, part: np.ndarray, buf: memoryview,
                  live: bool) -> list[bytes | memoryview]:
        """``buf`` compressed in place where nothing can have written it meanwhile, else from a copy.

        A private copy (``live`` False) is always compressed in place. Live RAM is, only if the tracker
        shows no page of it written since its last harvest, both before and after the call; where a page was
        written meanwhile the in-place result may rebuild pages nobody wrote from bytes that changed under
        the codec, so it is discarded and the packet compressed again through ``compress_parts``."""
        if not live:
            return encoder.compress_parts_stable(buf)
        witness = self.witness
        epoch = witness.write_epoch() if witness is not None else None
        first, n = int(part[0]), len(part)
        if witness is None or epoch is None or not witness.unwritten_since(epoch, block, first, n):
            self.in_place.add(copied=1)
            return encoder.compress_parts(buf)
        payload = encoder.compress_parts_stable(buf)
        if witness.unwritten_since(epoch, block, first, n):
            self.in_place.add(kept=1)
            return payload
        self.in_place.add(redone=1)
        log.debug("multifd_in_place_redone", block=block.name, first=first, pages=n)
        return encoder.compress_parts(buf)

    def _send_raw(self, ch: Channel, job: _Job, pages: np.ndarray, data: np.ndarray | None,
                  zero: np.ndarray) -> int:
        """Pages as they are (views of RAM where they are runs), in an uncompressed packet."""
        payload = [np.ascontiguousarray(data)] if data is not None else page_buffers(job.block, pages)
        # hashed before they go out: a page written meanwhile is dirty again and sent again (checksum module)
        hashes = page_hashes(job.block, pages, data) if self.checksums else None
        return self._send_packet(ch, job, 0, pages, zero, payload, hashes)

    def _send_end(self, ch: Channel, head: bytes) -> None:
        """A SYNC or FIN packet (header only)."""
        ch.sendv([head, trailer([head])] if self.checksums else [head])

    def _send_packet(self, ch: Channel, job: _Job, flags: int, pages: np.ndarray, zero: np.ndarray,
                     payload: list, hashes: np.ndarray | None = None) -> int:
        """One packet: header, offsets (pages, then zero pages), payload; returns the payload's size.

        With x-checksums the framing checksum follows the offsets and the page checksums the payload."""
        size = _nbytes(payload)
        offsets = np.concatenate([pages, zero]).astype("<u8") if len(zero) else pages.astype("<u8")
        head = pack_header(flags, job.pass_number, job.block_index, len(pages), len(zero), size, job.number)
        framing = [head, offsets, trailer([head, offsets])] if self.checksums else [head, offsets]
        tail = [hashes] if hashes is not None and len(hashes) else []
        before = ch.bytes_sent
        if self.zero_copy and payload:
            ch.sendv(framing)  # headers are short-lived Python objects: never zero-copy
            ch.sendv_zero_copy(payload)
            if tail:
                ch.sendv(tail)
        else:
            ch.sendv([*framing, *payload, *tail])
        self.counters.multifd_sent(ch.bytes_sent - before, len(pages), len(zero))
        return size


def _nbytes(buffers: Sequence[Any]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def _probe(encoder: Encoder, source: np.ndarray, rows: np.ndarray) -> float:
    """Compressed / raw size of ``PROBE_PAGES`` of a job's pages spread across it (``rows`` of ``source``, one
    page per row; only those are gathered); 0 for a job too small to be worth probing (compressing it is the
    probe)."""
    if len(rows) < 4 * PROBE_PAGES:
        return 0.0
    sample = source[rows[np.linspace(0, len(rows) - 1, PROBE_PAGES).astype(np.intp)]]  # a private copy
    return _nbytes(encoder.compress_parts_stable(sample.data.cast("B"))) / sample.nbytes


def connect_sender(params: Mapping[str, Any], registry: PluginRegistry, transport: Transport, addr: MigrationAddress,
                   should_abort: Callable[[], bool], counters: MigrationCounters, source_uuid: str, zero_copy: bool,
                   mapped: MappedRamWriter | None, checksums: bool = False) -> MultifdSender:
    """Connect ``multifd-channels`` more connections to ``addr`` and start a sender's threads on them."""
    name = str(params["multifd-compression"])
    factory = None
    if name != "none":
        comp = compressor.load(registry, name, counters.page_size)
        level = params[comp.level_parameter] if comp.level_parameter else 1
        log.info("multifd_compression_level", method=name, level=level)
        factory = lambda: comp.encoder(level)  # noqa: E731 - one encoder per channel thread
    channels = []
    direct_io = bool(params["direct-io"]) and mapped is not None
    try:
        for _ in range(params["multifd-channels"]):
            channels.append(transport.connect_extra(addr, should_abort, direct_io))
    except BaseException:
        for ch in channels:
            ch.close()
        raise
    sender = MultifdSender(channels, source_uuid, counters, factory,
                           detect_zero=params["zero-page-detection"].value == "multifd", zero_copy=zero_copy,
                           mapped=mapped, checksums=checksums)
    sender.start()
    log.info("multifd_started", channels=len(channels))
    return sender
