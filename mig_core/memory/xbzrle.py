"""XBZRLE: send a page that changed a little as the runs of bytes that changed (QEMU's format).

Encoding = pairs of ULEB128 lengths: a run of unchanged bytes, then a run of
changed bytes followed by those new bytes; no trailing unchanged run; an
unchanged page encodes to nothing. The source keeps a direct-mapped cache of
what it last sent for each page (``xbzrle-cache-size``) and encodes against it;
the destination applies the runs on top of its current page.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from mig_core.errors import StreamError

#: A cache entry younger than this many dirty syncs is not evicted by another page (QEMU's lifetime).
CACHED_PAGE_LIFETIME = 2
DECODE_ERROR = "Failed to load XBZRLE page - decode error!"


def _uleb(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


def encode(old: np.ndarray, new: np.ndarray, limit: int) -> bytes | None:
    """The encoding of ``new`` against ``old`` (uint8 rows); b"" if unchanged, None if it exceeds ``limit``."""
    diff = old != new
    if not diff.any():
        return b""
    # boundaries between runs of equal and changed bytes
    edges = np.flatnonzero(np.diff(diff.view(np.int8))) + 1
    bounds = np.concatenate(([0], edges, [len(diff)]))
    out = bytearray()
    prev_end = 0
    first_changed = 0 if diff[0] else 1
    starts, ends = bounds[first_changed:-1:2], bounds[first_changed + 1::2]
    raw = new.tobytes()
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        out += _uleb(s - prev_end)
        out += _uleb(e - s)
        out += raw[s:e]
        prev_end = e
        if len(out) > limit:
            return None
    return bytes(out)


def _read_uleb(data: bytes, pos: int) -> tuple[int, int]:
    if len(data) - pos < 2:  # QEMU: two input bytes must remain before each length
        raise StreamError(DECODE_ERROR)
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    if pos + 1 >= len(data) or data[pos + 1] >= 0x80:
        raise StreamError(DECODE_ERROR)
    return (b & 0x7F) | (data[pos + 1] << 7), pos + 2


def decode(data: bytes, page: np.ndarray) -> None:
    """Apply an encoding on top of ``page`` (a writable uint8 row), with QEMU's checks."""
    if len(data) > len(page):
        raise StreamError("Failed to load XBZRLE page - len overflow!")
    pos = out = 0
    first = True
    while pos < len(data):
        zrun, pos = _read_uleb(data, pos)
        if zrun == 0 and not first:
            raise StreamError(DECODE_ERROR)
        first = False
        out += zrun
        if pos >= len(data):
            raise StreamError(DECODE_ERROR)
        nzrun, pos = _read_uleb(data, pos)
        if nzrun == 0 or out + nzrun > len(page) or pos + nzrun > len(data):
            raise StreamError(DECODE_ERROR)
        page[out:out + nzrun] = np.frombuffer(data, dtype=np.uint8, count=nzrun, offset=pos)
        pos += nzrun
        out += nzrun


@dataclass
class XbzrleCounters:
    """XBZRLECacheStats, measured (rates over the last period of at least a second)."""

    cache_size: int
    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    overflow: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    _p_bytes: int = 0
    _p_hits: int = 0
    _p_miss: int = 0
    _p_pages: int = 0


class PageCache:
    """Direct-mapped cache of page copies keyed by page index; slots = size / page size (a power of two).

    With ``max_slots`` (the number of pages there are), no more slots than the next power of two of it
    are allocated: keys below ``max_slots`` then never share a slot, exactly as in a larger cache.
    """

    def __init__(self, size: int, page_size: int, max_slots: int | None = None) -> None:
        self.page_size = page_size
        self.slots = max(1, size // page_size)
        if max_slots is not None:
            self.slots = min(self.slots, 1 << max(0, max_slots - 1).bit_length())
        self.keys = np.full(self.slots, -1, dtype=np.int64)
        self.age = np.zeros(self.slots, dtype=np.int64)
        self.data = np.zeros((self.slots, page_size), dtype=np.uint8)  # calloc: untouched slots cost nothing
        self.lock = threading.Lock()

    def lookup(self, key: int) -> int | None:
        slot = key % self.slots
        return slot if self.keys[slot] == key else None

    def insert(self, key: int, page: np.ndarray, generation: int) -> int | None:
        """Cache ``page``; refused (None) when the slot holds another page still fresh."""
        slot = key % self.slots
        if self.keys[slot] not in (-1, key) and self.age[slot] + CACHED_PAGE_LIFETIME > generation:
            return None
        self.keys[slot] = key
        self.age[slot] = generation
        self.data[slot] = page
        return slot
