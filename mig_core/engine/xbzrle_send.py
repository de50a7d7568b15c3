"""The source's XBZRLE state: the page cache, the encoding of re-sent pages, and the statistics.

Pages are keyed by their index in guest RAM (blocks end to end, like QEMU's RAM
address), so a cache with at least as many slots as RAM has pages gives every
page a slot of its own; a larger one is never allocated. A page is cached on its first
send after the first complete pass; a later send encodes it against the cached
copy (QEMU's format, ``mig_core.memory.xbzrle``) and refreshes the cache while the
machine runs (at switchover nothing is sent again, so the cache stays as is).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import structlog

from mig_core.memory import xbzrle
from mig_core.memory.xbzrle import PageCache, XbzrleCounters
from mig_core.schema.migration import XBZRLECacheStats

log = structlog.get_logger("mig.xbzrle")


class XbzrleSender:
    """One migration's XBZRLE cache and counters; ``active`` once ``start`` ran."""

    def __init__(self, cache_size: int, page_size: int, block_pages: list[int]) -> None:
        """``block_pages``: the page count of each RAM block, in order (where each block's keys start)."""
        self.counters = XbzrleCounters(cache_size=cache_size)
        self.page_size = page_size
        self._base = [0, *itertools.accumulate(block_pages)][:-1]
        self._ram_pages = sum(block_pages)
        self.cache: PageCache | None = None
        self._period_start = time.monotonic()

    @property
    def active(self) -> bool:
        return self.cache is not None

    def start(self, size: int) -> None:
        """A new, empty cache of ``size`` bytes (at the start, and whenever the parameter changes)."""
        self.cache = PageCache(size, self.page_size, max_slots=self._ram_pages)
        self.counters.cache_size = size
        log.info("xbzrle_started", cache_size=size, slots=self.cache.slots)

    def resize_if_changed(self, size: int) -> None:
        if size != self.counters.cache_size:
            self.start(size)

    def zeroed(self, block_index: int, pages: np.ndarray, generation: int) -> None:
        """These pages were found zero and the destination holds zeros now: so must the cache."""
        cache = self.cache
        assert cache is not None
        base = self._base[block_index]
        zero_page = np.zeros(self.page_size, dtype=np.uint8)
        for p in pages.tolist():
            slot = cache.lookup(base + p)
            if slot is not None:
                cache.data[slot] = 0
            else:
                cache.insert(base + p, zero_page, generation)

    def encode(self, block_index: int, pages: np.ndarray, data: np.ndarray, generation: int,
               running: bool) -> tuple[list[int], list[bytes], list[int]]:
        """Split a batch: rows to send whole, encodings, and the rows those encodings are for.

        Unchanged pages are in neither list (nothing to send).
        """
        cache, x, ps = self.cache, self.counters, self.page_size
        assert cache is not None
        base = self._base[block_index]
        plain: list[int] = []
        encoded: list[bytes] = []
        enc_idx: list[int] = []
        for i, p in enumerate(pages.tolist()):
            key = base + p
            slot = cache.lookup(key)
            if slot is None:
                x.cache_miss += 1
                x._p_miss += 1
                if running:
                    cache.insert(key, data[i], generation)
                plain.append(i)
                continue
            x.pages += 1
            x._p_hits += 1
            enc = xbzrle.encode(cache.data[slot], data[i], ps)
            if enc == b"":
                continue  # unchanged since it was sent
            if enc is None:
                x.overflow += 1
                x.bytes += ps
                x._p_bytes += ps
                plain.append(i)
            else:
                encoded.append(enc)
                enc_idx.append(i)
                x.bytes += len(enc) + 3
                x._p_bytes += len(enc) + 3
            if running:
                cache.data[slot] = data[i]
                cache.age[slot] = generation
        x._p_pages += len(pages)
        return plain, encoded, enc_idx

    def period(self) -> None:
        """Rates over the period since the last one (called at syncs, at most once a second)."""
        x, t = self.counters, time.monotonic()
        if t - self._period_start < 1.0:
            return
        x.cache_miss_rate = x._p_miss / x._p_pages if x._p_pages else 0.0
        x.encoding_rate = x._p_hits * self.page_size / x._p_bytes if x._p_hits and x._p_bytes else 0.0
        x._p_bytes = x._p_hits = x._p_miss = x._p_pages = 0
        self._period_start = t

    def stats(self, cache_size: int) -> XBZRLECacheStats:
        x = self.counters
        return XBZRLECacheStats(cache_size=cache_size, bytes=x.bytes, pages=x.pages, cache_miss=x.cache_miss,
                                cache_miss_rate=round(x.cache_miss_rate, 4), encoding_rate=round(x.encoding_rate, 4),
                                overflow=x.overflow)
