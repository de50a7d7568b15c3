"""Checksums on the wire (capability ``x-checksums``): what TCP's 16-bit sum and an unencrypted link miss.

With the capability on, every section of the main stream and every multifd packet ends in an xxh3-64 of
its framing bytes (type, header, page offsets, metadata), and every page sent as it is carries an xxh3-64
of its contents. A framing checksum that fails stops the migration at once. A page checksum cannot: page
data goes out straight from RAM, which a vCPU may write between the hash and the send; such a page is
dirty again, though, and the source sends it again in a later pass (the last one with vCPUs stopped). So
a page whose checksum fails is *suspect* until it arrives again intact; one still suspect when the
stream ends was corrupted on the way, and the destination fails the migration instead of running it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable

import numpy as np
import structlog
import xxhash

from mig_core.memory.ram import RAMBlock

log = structlog.get_logger("mig.checksum")

#: the framing checksum after each section or packet
TRAILER = struct.Struct("<Q")
#: header flag (main stream and multifd init packet): the source sends checksums
FLAG_CHECKSUMS = 0x1


def digest(buffers: Iterable[object]) -> int:
    """xxh3-64 of the buffers' bytes, one after another."""
    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)  # type: ignore[arg-type]
    return h.intdigest()


def trailer(buffers: Iterable[object]) -> bytes:
    return TRAILER.pack(digest(buffers))


def matches(buffers: Iterable[object], received: bytes) -> bool:
    """Whether ``received`` (a trailer as read) is the checksum of the buffers' bytes."""
    return TRAILER.unpack(received)[0] == digest(buffers)


def page_hashes(block: RAMBlock, pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """xxh3-64 of each page's bytes: of ``rows`` (one row per page) if given, else of the pages in RAM."""
    out = np.empty(len(pages), dtype="<u8")
    h = xxhash.xxh3_64_intdigest  # no batch form exists: one call per page
    ps = block.page_size
    if rows is not None:
        mv = np.ascontiguousarray(rows).data.cast("B")
        for i in range(len(pages)):
            out[i] = h(mv[i * ps:(i + 1) * ps])
        return out
    view = block.view
    for i, p in enumerate(pages.tolist()):
        out[i] = h(view[p * ps:(p + 1) * ps])
    return out


class SuspectPages:
    """Pages whose checksum failed and that have not arrived intact since; thread-safe (multifd channels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bad: dict[str, set[int]] = {}

    def check(self, block: RAMBlock, pages: np.ndarray, expected: np.ndarray, rows: np.ndarray | None = None) -> int:
        """Compare the pages as they landed (``rows``, else RAM) with the source's hashes; returns how many
        failed. Failed pages become suspect; intact ones stop being."""
        got = page_hashes(block, pages, rows)
        bad = got != expected
        nbad = int(bad.sum())
        with self._lock:
            held = self._bad.get(block.name)
            if held:
                held.difference_update(pages[~bad].tolist())
            if nbad:
                self._bad.setdefault(block.name, set()).update(pages[bad].tolist())
        if nbad:  # a page written while it went out (sent again later), or one corrupted on the way
            log.debug("pages_suspect", block=block.name, count=nbad, first=int(pages[bad][0]))
        return nbad

    def clear(self, block: RAMBlock, pages: np.ndarray) -> None:
        """These pages arrived again by another way (zero pages, XBZRLE under a framing checksum)."""
        with self._lock:
            held = self._bad.get(block.name)
            if held:
                held.difference_update(pages.tolist())

    def remaining(self) -> str | None:
        """Why the stream cannot be trusted (pages still suspect), or None."""
        with self._lock:
            for name, pages in self._bad.items():
                if pages:
                    return (f"page data failed its checksum: {len(pages)} page(s) of RAM block '{name}' (the "
                            f"first: page {min(pages)}) arrived corrupt and were not sent again")
        return None
