"""mapped-ram: RAM at fixed file offsets, so pages are rewritten in place and loaded without a scan.

After the stream's CONFIG, a ``MAPPED_RAM`` section describes one region per
RAM block: a bitmap (one bit per page, set = the page's data is in the file)
and the page area (page i at ``pages_offset + i × page_size``), both starting
on 1 MiB boundaries of the file. The stream itself continues after the last
region. Writers use positioned writes (several channels in parallel), the
bitmap goes in at the end, and the file never grows past RAM size + metadata
however many passes run. Layout details: docs/stream-format.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import numpy as np

from mig_core.errors import StreamError
from mig_core.ext.channel import Channel
from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock
from mig_core.stream.format import META_HEADER, Section

MAPPED_RAM_VERSION = 1
ALIGN = 1 << 20
#: a region is read in chunks of at most this much (prompt abort, work for every reader thread)
READ_CHUNK = 4 << 20


def _align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _aligned(rows: np.ndarray, align: int) -> memoryview:
    raw = np.empty(rows.nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + rows.nbytes]
    out[:] = rows.reshape(-1).view(np.uint8)
    return out.data


@dataclass(frozen=True)
class BlockRegion:
    name: str
    page_size: int
    npages: int
    bitmap_offset: int
    pages_offset: int

    @property
    def bitmap_bytes(self) -> int:
        return (self.npages + 63) // 64 * 8  # whole 64-bit words, as QEMU's unsigned longs

    def to_wire(self) -> list:
        return [self.name, MAPPED_RAM_VERSION, self.page_size, self.bitmap_offset, self.pages_offset]


@dataclass(frozen=True)
class MappedRamLayout:
    regions: list[BlockRegion]
    #: where the stream continues after the regions
    resume_offset: int


def plan(blocks: Sequence[RAMBlock], section_offset: int) -> tuple[MappedRamLayout, bytes]:
    """Lay the blocks out after a MAPPED_RAM section written at ``section_offset``; return the layout
    and the framed section. Offsets are encoded as msgpack uint64 so the size is known in advance."""

    def frame(layout: MappedRamLayout) -> bytes:
        obj = [r.to_wire() for r in layout.regions]
        payload = msgpack.packb([obj, layout.resume_offset], use_bin_type=True)
        return META_HEADER.pack(Section.MAPPED_RAM, len(payload)) + payload

    def build(start: int) -> MappedRamLayout:
        regions, pos = [], start
        for b in blocks:
            bitmap = pos
            pages = _align_up(bitmap + (b.npages + 63) // 64 * 8)
            regions.append(BlockRegion(b.name, b.page_size, b.npages, bitmap, pages))
            pos = _align_up(pages + b.npages * b.page_size)
        return MappedRamLayout(regions, pos)

    # the largest the section can be: every offset as a full 64-bit integer
    worst = len(frame(build(1 << 62)))
    layout = build(_align_up(section_offset + worst))
    return layout, frame(layout)


def parse(obj: object, blocks: Sequence[RAMBlock], section_end: int) -> MappedRamLayout:
    """Check a received MAPPED_RAM section against the source's block list; ValueError says what is wrong."""
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], list) and isinstance(obj[1], int)):
        raise StreamError("corrupt MAPPED_RAM section")
    entries, resume = obj
    if len(entries) != len(blocks):
        raise StreamError(f"the MAPPED_RAM section lists {len(entries)} blocks, the stream {len(blocks)}")
    regions, floor = [], section_end
    for e, b in zip(entries, blocks, strict=True):
        if not (isinstance(e, list) and len(e) == 5 and all(isinstance(x, int) for x in e[1:])):
            raise StreamError(f"corrupt MAPPED_RAM entry {e!r}")
        name, version, page_size, bitmap_offset, pages_offset = e
        if version > MAPPED_RAM_VERSION:
            raise StreamError(f"Migration mapped-ram capability version not supported (expected <= "
                             f"{MAPPED_RAM_VERSION}, got {version})")
        if name != b.name or page_size != b.page_size:
            raise StreamError(f"MAPPED_RAM region for '{name}' (page size {page_size}) does not match RAM block "
                             f"'{b.name}' (page size {b.page_size})")
        r = BlockRegion(name, page_size, b.npages, bitmap_offset, pages_offset)
        if bitmap_offset < floor or pages_offset < bitmap_offset + r.bitmap_bytes:
            raise StreamError(f"MAPPED_RAM region for '{name}' overlaps what precedes it")
        if pages_offset % page_size or pages_offset % 4096:
            raise StreamError(f"Error reading ramblock {name} pages, region has bad alignment")
        regions.append(r)
        floor = pages_offset + b.npages * page_size
    if resume < floor:
        raise StreamError(f"the stream resumes at {resume}, inside the RAM regions (they end at {floor})")
    return MappedRamLayout(regions, resume)


class MappedRamWriter:
    """Positioned page writes into the layout, and the present-pages bitmaps written at the end."""

    def __init__(self, layout: MappedRamLayout, blocks: Sequence[RAMBlock]) -> None:
        self.layout = layout
        self.region = {r.name: r for r in layout.regions}
        self.present = {b.name: np.zeros(b.npages, dtype=bool) for b in blocks}

    def write(self, channel: Channel, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None = None) -> int:
        """Write ``pages`` (sorted) at their offsets, straight from RAM (or from ``data`` rows)."""
        r, ps = self.region[block.name], block.page_size
        starts, ends = pages_to_runs(pages)
        pos = 0
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if data is not None:  # copied to a page-aligned buffer: O_DIRECT (direct-io) needs one
                buf = _aligned(data[pos:pos + e - s], ps)
            else:
                buf = block.read_view[s * ps:e * ps]
            channel.pwritev([buf], r.pages_offset + s * ps)
            pos += e - s
        self.present[block.name][pages] = True
        return len(pages) * ps

    def zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        """These pages are zero now: their bits are cleared and whatever the file holds there is ignored."""
        self.present[block.name][pages] = False

    def write_bitmaps(self, channel: Channel) -> int:
        total = 0
        for r in self.layout.regions:
            words = np.packbits(self.present[r.name], bitorder="little")
            buf = np.zeros(r.bitmap_bytes, dtype=np.uint8)
            buf[:len(words)] = words
            channel.pwritev([buf], r.bitmap_offset)
            total += buf.nbytes
        return total


def load(main: Channel, channels: Sequence[Channel], layout: MappedRamLayout, blocks: Sequence[RAMBlock],
         file_size: int, on_pages: Callable[[RAMBlock, np.ndarray], None]) -> int:
    """Read every present page into RAM, the chunks spread over ``channels`` (one thread each).

    ``main`` reads the bitmaps (small, unaligned reads: never an O_DIRECT descriptor).
    ``on_pages(block, pages)`` is called for each chunk loaded. Returns the pages loaded.
    """
    work: list[tuple[RAMBlock, int, int, int]] = []  # block, first page, end page, file offset
    for r, b in zip(layout.regions, blocks, strict=True):
        if r.bitmap_offset + r.bitmap_bytes > file_size:
            raise StreamError(f"Error reading dirty bitmap of RAM block '{r.name}': the file ends at {file_size}, "
                             f"before its bitmap ({r.bitmap_offset}..{r.bitmap_offset + r.bitmap_bytes})")
        raw = np.empty(r.bitmap_bytes, dtype=np.uint8)
        main.preadv_into(raw, r.bitmap_offset)
        present = np.unpackbits(raw, bitorder="little")[:r.npages].astype(bool)
        if present.any():
            last = int(np.flatnonzero(present)[-1])
            need = r.pages_offset + (last + 1) * r.page_size
            if need > file_size:
                raise StreamError(f"truncated file: RAM block '{r.name}' has pages up to byte {need} of the file, "
                                 f"but the file has {file_size} bytes")
        starts, ends = pages_to_runs(np.flatnonzero(present))
        step = max(1, READ_CHUNK // r.page_size)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            for c in range(s, e, step):
                ce = min(e, c + step)
                work.append((b, c, ce, r.pages_offset + c * r.page_size))

    def read(i: int) -> int:
        n = 0
        ch = channels[i % len(channels)]
        for b, s, e, off in work[i::len(channels)]:
            ch.preadv_into(b.view[s * b.page_size:e * b.page_size], off)
            on_pages(b, np.arange(s, e))
            n += e - s
        return n

    if len(channels) == 1:
        return read(0)
    with ThreadPoolExecutor(len(channels), thread_name_prefix="mig/dst/mapped") as pool:
        return sum(pool.map(read, range(len(channels))))

