"""Sending one pass of dirty RAM on the source: batches, the zero test, and the channel each batch takes.

The migration thread walks the pass's pages in batches of ``BATCH_PAGES`` (larger
multifd jobs where max-bandwidth allows, ``batch_pages``): each batch is tested
for zero pages on this thread (by the multifd sender under multifd detection),
then goes to the multifd channels, through xbzrle, or onto the main stream, and
max-bandwidth paces what was written. A pass ends early when postcopy is due:
what it had not sent yet is kept for postcopy.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from mig_core.engine.context import EngineContext
from mig_core.engine.multifd_send import MultifdSender
from mig_core.engine.stats import WINDOW_S, MigrationCounters, RateLimiter
from mig_core.engine.xbzrle_send import XbzrleSender
from mig_core.ext.channel import Channel
from mig_core.ext.dirty_tracker import DirtyConsumer
from mig_core.machine.machine import Machine
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import zero_mask
from mig_core.stream.mapped_ram import MappedRamWriter
from mig_core.stream.writer import StreamWriter

#: Pages handed to one write (4 MiB of 4 KiB pages): small enough for prompt cancel and rate limiting.
BATCH_PAGES = 1024
#: Bytes of one multifd job where pacing allows it (``batch_pages``). Every job costs the migration thread,
#: a channel thread and a receiver a fixed amount of Python besides its pages (about 0.35 ms in all), so
#: larger jobs leave more of the cores to the codec and the copies. Measured for issue 21, 1 GiB over
#: 2 channels, 3 alternating runs each: with zstd, text-like 0.251-0.254 s against 0.287-0.305 s with
#: 4 MiB jobs, random 0.203-0.235 s against 0.247-0.315 s; text-like zlib 0.30 s against 0.32-0.37 s.
#: 32 MiB jobs were no faster than 16 MiB.
MULTIFD_JOB_BYTES = 16 << 20


class PassSender(Protocol):
    """What sending a pass uses of the outgoing migration."""

    ctx: EngineContext
    machine: Machine
    counters: MigrationCounters
    limiter: RateLimiter
    cancel_requested: threading.Event
    writer: StreamWriter
    multifd: MultifdSender | None
    mapped: MappedRamWriter | None
    xbzrle: XbzrleSender
    #: per block: which pages the destination holds as non-zero (a zero page there needs a marker)
    _sent_nonzero: dict[str, np.ndarray]
    _block_index: dict[str, int]
    #: the zero test runs on the migration thread (legacy detection, or multifd detection without multifd)
    _main_thread_zero: bool
    #: bytes of the main channel counted so far
    _accounted: int
    #: what a pass cut short by postcopy had not sent yet
    _unsent: dict[str, np.ndarray] | None

    @property
    def _ch(self) -> Channel: ...

    @property
    def _dirty(self) -> DirtyConsumer: ...

    def _account(self, pages: int, running: bool) -> None: ...

    def _check_cancel(self) -> None: ...

    def _postcopy_due(self) -> bool: ...


def account_and_pace(m: PassSender, pages: int, running: bool) -> None:
    """Count what the channel sent since the last call, then wait as max-bandwidth asks for those bytes."""
    before = m._accounted
    m._account(pages, running)
    delay = m.limiter.wait_time(m._accounted - before)
    if delay:
        m.cancel_requested.wait(delay)


def send_pages(m: PassSender, pages: dict[str, np.ndarray], running: bool) -> None:
    """Send ``pages`` (per block, sorted) in batches; ``running``: the machine runs (a pass, not the last)."""
    for bi, b in enumerate(m.machine.blocks):
        idx = pages[b.name]
        i = 0
        while i < len(idx):
            m._check_cancel()
            if running and m._postcopy_due():  # what this pass has not sent yet goes in postcopy
                m._unsent = {x.name: (pages[x.name][i:] if x is b else pages[x.name][len(pages[x.name]):]
                                      if xi < bi else pages[x.name])
                             for xi, x in enumerate(m.machine.blocks)}
                return
            limit = m.ctx.parameter("max-bandwidth") if running else 0
            m.limiter.set_limit(limit)
            batch = idx[i:i + batch_pages(b.page_size, limit, m.multifd is not None)]
            _send_batch(m, b, batch, running)
            m.counters.remaining = max(0, m.counters.remaining - len(batch) * b.page_size)
            i += len(batch)


def batch_pages(page_size: int, limit: int, multifd: bool) -> int:
    """Pages of the next batch: ``BATCH_PAGES``, or for multifd up to ``MULTIFD_JOB_BYTES`` where max-bandwidth
    (``limit``, bytes/s) is unlimited or lets one 100 ms window carry a whole job, so pacing stays as fine as
    QEMU's (a window's budget is limit/10 bytes)."""
    if multifd and (limit < 10 or limit * WINDOW_S >= MULTIFD_JOB_BYTES):
        return max(BATCH_PAGES, MULTIFD_JOB_BYTES // page_size)
    return BATCH_PAGES


def _send_batch(m: PassSender, b: RAMBlock, pages: np.ndarray, running: bool) -> None:
    """One batch: zero pages as markers (when this thread tests), the rest by multifd, xbzrle or the stream."""
    c = m.counters
    if m._main_thread_zero:
        is_zero = zero_mask(b.read_words, pages)
        if is_zero.any():
            zero = pages[is_zero]
            pages = pages[~is_zero]
            c.duplicate += len(zero)
            if m.xbzrle.active and running:
                m.xbzrle.zeroed(m._block_index[b.name], zero, m.counters.dirty_sync_count)
            stale = zero[m._sent_nonzero[b.name][zero]]
            if m.mapped is not None:
                m.mapped.zero(b, zero)
            elif len(stale):
                m.writer.write_zero_pages(b, stale)
                m._sent_nonzero[b.name][stale] = False
                m._account(len(stale), running)
                m._dirty.sent(b, stale, np.zeros((len(stale), b.page_size), dtype=np.uint8))
    if not len(pages):
        return
    if m.multifd is not None:
        _send_multifd(m, b, pages, running)
        return
    if m.xbzrle.active:
        _send_xbzrle(m, b, pages, running)
        return
    data = None
    if m._dirty.wants_copies:
        data = b.read_pages[pages]  # the copy that is both sent and recorded
        m._dirty.sent(b, pages, data)
    if m.mapped is not None:
        nbytes = m.mapped.write(m._ch, b, pages, data)
    else:
        nbytes = m.writer.write_pages(b, pages, data)
    m._sent_nonzero[b.name][pages] = True
    c.normal += len(pages)
    m._account(len(pages), running)
    delay = m.limiter.wait_time(nbytes)
    if delay:
        m.cancel_requested.wait(delay)


def _send_multifd(m: PassSender, b: RAMBlock, pages: np.ndarray, running: bool) -> None:
    """Queue the batch for the multifd channels, which write it (the sender tests it for zeros first)."""
    data = None
    if m._dirty.wants_copies:
        data = b.read_pages[pages]  # the copy that is both sent and recorded
        m._dirty.sent(b, pages, data)
    m._sent_nonzero[b.name][pages] = True
    assert m.multifd is not None
    m.multifd.send(m._block_index[b.name], b, pages, data, m.counters.dirty_sync_count, m._check_cancel)
    m._account(0, running)  # the main channel's share (zero-page markers under legacy detection)
    delay = m.limiter.wait_time(len(pages) * b.page_size)
    if delay:
        m.cancel_requested.wait(delay)


def _send_xbzrle(m: PassSender, b: RAMBlock, pages: np.ndarray, running: bool) -> None:
    """Encode the batch against the xbzrle cache: deltas where they pay, the pages themselves elsewhere."""
    m.xbzrle.resize_if_changed(m.ctx.parameter("xbzrle-cache-size"))  # resizable while migrating
    data = b.read_pages[pages]  # a snapshot: what is encoded, sent and cached is the same
    plain, encoded, enc_idx = m.xbzrle.encode(m._block_index[b.name], pages, data, m.counters.dirty_sync_count,
                                              running)
    if plain:
        idx = np.array(plain)
        m.writer.write_pages(b, pages[idx], data[idx])
        m.counters.normal += len(idx)
    if encoded:
        m.writer.write_xbzrle_pages(b, pages[np.array(enc_idx)], encoded)
    m._sent_nonzero[b.name][pages] = True
    m._dirty.sent(b, pages, data)
    account_and_pace(m, len(plain) + len(encoded), running)
