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
        return [block.view[int(pages[0]) * ps:(int(pages[-1]) + 1) * ps]]
    starts, ends = pages_to_runs(pages)
    if len(starts) <= max_runs:
        view = block.view
        return [view[s * ps:e * ps] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    return [block.pages[pages]]  # numpy gather: one copy, no per-page work


class ByteSink(Protocol):
    """Where a stream is written: a channel, or the engine's write-behind queue in front of one."""

    def sendv(self, buffers: Sequence[Buffer]) -> None: ...

    def send(self, data: Buffer) -> None: ...


class StreamWriter:
    """Frames sections onto a channel; page data goes out with sendmsg straight from RAM when it can."""

    def __init__(self, channel: ByteSink, blocks: Sequence[RAMBlock]) -> None:
        self.channel = channel
        self.blocks = list(blocks)
        self._index = {b.name: i for i, b in enumerate(self.blocks)}

    def block_index(self, block: RAMBlock) -> int:
        return self._index[block.name]

    def write_header(self, source_uuid: str) -> None:
        """Magic, version, uuid, then the block list (the destination checks it against its own)."""
        self.channel.send(HEADER.pack(MAGIC, VERSION, 0, uuid_mod.UUID(source_uuid).bytes))
        self._meta(Section.BLOCKS, [[b.name, b.size, b.page_size] for b in self.blocks])

    def _meta(self, section: Section, obj: object) -> None:
        payload = msgpack.packb(obj, use_bin_type=True)
        self.channel.sendv([META_HEADER.pack(section, len(payload)), payload])

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
            self.channel.sendv([head, block.view[page * ps:(page + 1) * ps]])
            return len(head) + ps
        idx = np.ascontiguousarray(pages, dtype="<u8")
        head = PAGES_HEADER.pack(Section.PAGES, PageEncoding.RAW, self._index[block.name], len(idx))
        bufs = [head, idx, np.ascontiguousarray(data)] if data is not None else [head, idx, *page_buffers(block, pages)]
        self.channel.sendv(bufs)
        return PAGES_HEADER.size + idx.nbytes + len(pages) * block.page_size

    def write_zero_pages(self, block: RAMBlock, pages: np.ndarray) -> int:
        """Tell the destination these pages are zero now (no page data travels)."""
        step = MAX_BATCH_PAGES
        total = 0
        for i in range(0, len(pages), step):
            idx = np.ascontiguousarray(pages[i:i + step], dtype="<u8")
            self.channel.sendv([PAGES_HEADER.pack(Section.PAGES, PageEncoding.ZERO, self._index[block.name],
                                                  len(idx)), idx])
            total += PAGES_HEADER.size + idx.nbytes
        return total

    def write_xbzrle_pages(self, block: RAMBlock, pages: np.ndarray, encodings: list[bytes]) -> int:
        """Send pages as XBZRLE encodings against what the destination holds (one batch)."""
        idx = np.ascontiguousarray(pages, dtype="<u8")
        lengths = np.array([len(e) for e in encodings], dtype="<u2")
        self.channel.sendv([PAGES_HEADER.pack(Section.PAGES, PageEncoding.XBZRLE, self._index[block.name], len(idx)),
                            idx, lengths, *encodings])
        return PAGES_HEADER.size + idx.nbytes + lengths.nbytes + int(lengths.sum())

    def write_device(self, section: DeviceSection) -> None:
        self._meta(Section.DEVICE, [section.id, section.instance, section.version, section.payload])

    def write_device_part(self, dev_id: str, instance: int, version: int, chunk: bytes) -> None:
        self._meta(Section.DEVICE_PART, [dev_id, instance, version, chunk])

    def write_command(self, command: Command, argument: object = None) -> None:
        self._meta(Section.COMMAND, [int(command), argument])

    def write_pass(self, number: int) -> None:
        self._meta(Section.PASS, [number])

    def write_end(self) -> None:
        self.channel.send(bytes([Section.END]))
