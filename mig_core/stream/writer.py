"""Writing a stream: header, block list, page batches, device state, commands, end marker."""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Sequence
from typing import Protocol

import msgpack
import numpy as np

from mig_core.ext.channel import IOV_MAX, Buffer
from mig_core.machine.device import DeviceSection
from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock
from mig_core.stream.checksum import FLAG_CHECKSUMS, page_hashes, trailer
from mig_core.stream.format import (
    HEADER,
    MAGIC,
    MAX_BATCH_BYTES,
    MAX_BATCH_PAGES,
    META_HEADER,
    PAGES_HEADER,
    VERSION,
    Command,
    PageEncoding,
    Section,
)

_U64 = struct.Struct("<Q")

#: Scatter-gather from RAM when a batch has at most this many runs; gather-copy otherwise.
_MAX_RUNS = IOV_MAX - 3


def page_buffers(block: RAMBlock, pages: np.ndarray, max_runs: int = _MAX_RUNS) -> list[Buffer]:
    """The bytes of ``pages`` (sorted) in order: views of RAM per contiguous run, or one gathered copy
    when there are more runs than one sendmsg takes."""
    ps = block.page_size
    if len(pages) and int(pages[-1]) - int(pages[0]) + 1 == len(pages):  # one run: no run search
        return [block.read_view[int(pages[0]) * ps:(int(pages[-1]) + 1) * ps]]
    starts, ends = pages_to_runs(pages)
    if len(starts) <= max_runs:
        view = block.read_view
        return [view[s * ps:e * ps] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    return [block.read_pages[pages]]  # numpy gather: one copy, no per-page work


class ByteSink(Protocol):
    """Where a stream is written: a channel, or the engine's write-behind queue in front of one."""

    def sendv(self, buffers: Sequence[Buffer]) -> None: ...

    def send(self, data: Buffer) -> None: ...


class StreamWriter:
    """Frames sections onto a channel; page data goes out with sendmsg straight from RAM when it can."""

    def __init__(self, channel: ByteSink, blocks: Sequence[RAMBlock], checksums: bool = False) -> None:
        self.channel = channel
        self.blocks = list(blocks)
        self._index = {b.name: i for i, b in enumerate(self.blocks)}
        #: x-checksums: each section ends in a framing checksum, each page sent as it is has its own
        self.checksums = checksums

    def block_index(self, block: RAMBlock) -> int:
        return self._index[block.name]

    def write_header(self, source_uuid: str) -> None:
        """Magic, version, uuid, then the block list (the destination checks it against its own)."""
        flags = FLAG_CHECKSUMS if self.checksums else 0
        header = HEADER.pack(MAGIC, VERSION, flags, uuid_mod.UUID(source_uuid).bytes)
        self.channel.send(header)
        self._meta(Section.BLOCKS, [[b.name, b.size, b.page_size] for b in self.blocks], covered=header)

    def _meta(self, section: Section, obj: object, covered: bytes = b"") -> None:
        """A metadata section; its checksum also covers ``covered`` (the stream header, before the block list)."""
        payload = msgpack.packb(obj, use_bin_type=True)
        bufs = [META_HEADER.pack(section, len(payload)), payload]
        self.channel.sendv([*bufs, trailer([covered, *bufs])] if self.checksums else bufs)

    def max_batch(self, block: RAMBlock) -> int:
        """Most pages one batch of this block may carry."""
        return max(1, min(MAX_BATCH_PAGES, MAX_BATCH_BYTES // block.page_size))

    def write_pages(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None = None) -> int:
        """Send ``pages`` of ``block`` (sorted indices); ``data`` (one row per page) instead of RAM if given.

        Returns the bytes written. Batches larger than the limit are split.
        """
        step = self.max_batch(block)
        total = 0
        for i in range(0, len(pages), step):
            part = pages[i:i + step]
            total += self._batch(block, part, None if data is None else data[i:i + step])
        return total

    def _batch(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> int:
        if len(pages) == 1 and data is None:  # one page (a postcopy request's): no array work
            page, ps = int(pages[0]), block.page_size
            head = PAGES_HEADER.pack(Section.PAGES, PageEncoding.RAW, self._index[block.name], 1) + _U64.pack(page)
            if self.checksums:
                return self._checked(block, head, b"", pages, [block.view[page * ps:(page + 1) * ps]], None)
            self.channel.sendv([head, block.view[page * ps:(page + 1) * ps]])
            return len(head) + ps
        idx = np.ascontiguousarray(pages, dtype="<u8")
        head = PAGES_HEADER.pack(Section.PAGES, PageEncoding.RAW, self._index[block.name], len(idx))
        payload = [np.ascontiguousarray(data)] if data is not None else page_buffers(block, pages)
        if self.checksums:
            return self._checked(block, head, idx, pages, payload, data)
        self.channel.sendv([head, idx, *payload])
        return PAGES_HEADER.size + idx.nbytes + len(pages) * block.page_size

    def _checked(self, block: RAMBlock, head: bytes, idx: Buffer, pages: np.ndarray, payload: list[Buffer],
                 data: np.ndarray | None) -> int:
        """A raw batch with its checksums: framing (header, offsets), then one per page, hashed now (a page a
        vCPU writes before it goes out is dirty again, and sent again: see mig_core.stream.checksum)."""
        hashes = page_hashes(block, pages, data)
        self.channel.sendv([head, idx, *payload, trailer([head, idx]), hashes])
        return len(head) + len(memoryview(idx).cast("B")) + len(pages) * block.page_size + 8 + hashes.nbytes

    def write_zero_pages(self, block: RAMBlock, pages: np.ndarray) -> int:
        """Tell the destination these pages are zero now (no page data travels)."""
        step = MAX_BATCH_PAGES
        total = 0
        for i in range(0, len(pages), step):
            idx = np.ascontiguousarray(pages[i:i + step], dtype="<u8")
            bufs = [PAGES_HEADER.pack(Section.PAGES, PageEncoding.ZERO, self._index[block.name], len(idx)), idx]
            self.channel.sendv([*bufs, trailer(bufs)] if self.checksums else bufs)
            total += PAGES_HEADER.size + idx.nbytes + (8 if self.checksums else 0)
        return total

    def write_xbzrle_pages(self, block: RAMBlock, pages: np.ndarray, encodings: list[bytes]) -> int:
        """Send pages as XBZRLE encodings against what the destination holds (one batch)."""
        idx = np.ascontiguousarray(pages, dtype="<u8")
        lengths = np.array([len(e) for e in encodings], dtype="<u2")
        bufs = [PAGES_HEADER.pack(Section.PAGES, PageEncoding.XBZRLE, self._index[block.name], len(idx)),
                idx, lengths, *encodings]
        self.channel.sendv([*bufs, trailer(bufs)] if self.checksums else bufs)  # encodings: private copies
        return PAGES_HEADER.size + idx.nbytes + lengths.nbytes + int(lengths.sum()) + (8 if self.checksums else 0)

    def write_device(self, section: DeviceSection) -> None:
        self._meta(Section.DEVICE, [section.id, section.instance, section.version, section.payload])

    def write_device_part(self, dev_id: str, instance: int, version: int, chunk: bytes) -> None:
        self._meta(Section.DEVICE_PART, [dev_id, instance, version, chunk])

    def write_command(self, command: Command, argument: object = None) -> None:
        self._meta(Section.COMMAND, [int(command), argument])

    def write_pass(self, number: int) -> None:
        self._meta(Section.PASS, [number])

    def write_end(self) -> None:
        end = bytes([Section.END])
        self.channel.send(end + trailer([end]) if self.checksums else end)
