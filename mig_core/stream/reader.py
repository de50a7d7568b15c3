"""Reading a stream: every field is checked before anything lands in RAM.

A wrong magic, version, block, size, offset or count, a truncated or garbage
stream raises ``StreamError`` with a precise message; nothing is ever written
outside a block, and a peer that closes early ends the read (no hang).
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from mig_core.errors import StreamError
from mig_core.ext.channel import Channel, ChannelEOF
from mig_core.machine.device import DeviceSection
from mig_core.memory import xbzrle
from mig_core.memory.ram import RAMBlock
from mig_core.stream import mapped_ram
from mig_core.stream.checksum import FLAG_CHECKSUMS, TRAILER, SuspectPages, matches
from mig_core.stream.format import (
    HEADER,
    MAGIC,
    MAX_BATCH_BYTES,
    MAX_BATCH_PAGES,
    MAX_BLOCKS,
    MAX_META_BYTES,
    META_HEADER,
    PAGES_HEADER,
    VERSION,
    Command,
    PageEncoding,
    Section,
)
from mig_core.stream.mapped_ram import MappedRamLayout
from mig_core.stream.placement import PagePlacer


@dataclass(frozen=True)
class PagesReceived:
    block: RAMBlock
    pages: np.ndarray
    encoding: PageEncoding


@dataclass(frozen=True)
class DevicePart:
    id: str
    instance: int
    version: int
    chunk: bytes


@dataclass(frozen=True)
class CommandReceived:
    command: Command
    argument: Any


@dataclass(frozen=True)
class PassEnd:
    number: int


@dataclass(frozen=True)
class End:
    pass


Item = PagesReceived | DeviceSection | DevicePart | CommandReceived | PassEnd | MappedRamLayout | End


_U64 = struct.Struct("<Q")


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise StreamError(message)


class StreamReader:
    """Reads one stream from a channel into local RAM blocks through a page placer."""

    def __init__(self, channel: Channel, blocks: Sequence[RAMBlock], placer: PagePlacer) -> None:
        self.channel = channel
        self.local = {b.name: b for b in blocks}
        self.placer = placer
        self.source_uuid = ""
        self.version = 0
        self._blocks: list[RAMBlock] = []  # indexed as the source numbered them
        self._staging = np.empty(0, dtype=np.uint8)
        #: the source sends checksums (x-checksums; its header says so)
        self.checksums = False
        #: pages whose checksum failed, until they arrive again intact (the multifd channels share it)
        self.suspects = SuspectPages()

    @classmethod
    def continuing(cls, channel: Channel, source_blocks: Sequence[RAMBlock], placer: PagePlacer) -> StreamReader:
        """A reader that takes over a stream whose header another reader checked (postcopy's page server)."""
        reader = cls(channel, source_blocks, placer)
        reader._blocks = list(source_blocks)
        reader.version = VERSION
        return reader

    def _recv(self, n: int, what: str) -> bytes:
        try:
            return self.channel.recv_exact(n)
        except ChannelEOF as e:
            raise StreamError(f"truncated stream: it ended inside {what} ({e})") from None

    def _recv_into(self, buf: Any, what: str) -> None:
        try:
            self.channel.recv_into(buf)
        except ChannelEOF as e:
            raise StreamError(f"truncated stream: it ended inside {what} ({e})") from None

    # -- header ----------------------------------------------------------------

    @property
    def source_blocks(self) -> list[RAMBlock]:
        """This host's blocks in the order the source numbered them."""
        return list(self._blocks)

    def read_header(self, prefix: bytes = b"") -> None:
        """Check magic, version and the source's block list against this host's blocks.

        ``prefix``: the header's first bytes when the caller already read them (to tell channels apart).
        """
        head = prefix + self._recv(HEADER.size - len(prefix), "the stream header")
        magic, version, flags, raw_uuid = HEADER.unpack(head)
        _expect(magic == MAGIC, f"not a mig migration stream (bad magic {magic!r})")
        _expect(version != 0 and version <= VERSION,
                f"the stream has format version {version}; this host reads version {VERSION}")
        _expect(flags & ~FLAG_CHECKSUMS == 0, f"unknown stream header flags {flags:#x}")
        self.checksums = bool(flags & FLAG_CHECKSUMS)
        self.version = version
        self.source_uuid = str(uuid_mod.UUID(bytes=raw_uuid))
        (section,) = self._recv(1, "the block list")
        _expect(section == Section.BLOCKS, f"the stream must start with its block list, not section {section:#04x}")
        blocks = self._meta(Section.BLOCKS, covered=head)
        _expect(isinstance(blocks, list) and 0 < len(blocks) <= MAX_BLOCKS,
                "corrupt block list: expected 1 to 4096 blocks")
        seen: set[str] = set()
        for entry in blocks:
            _expect(isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in entry[1:]),
                    f"corrupt block list entry {entry!r}")
            name, size, page_size = entry
            _expect(name not in seen, f"the block list names RAM block '{name}' twice")
            seen.add(name)
            local = self.local.get(name)
            _expect(local is not None, f"the source has RAM block '{name}' ({size} bytes), which this host "
                                       "does not have")
            assert local is not None
            _expect(size == local.size, f"RAM block '{name}' is {size} bytes on the source but {local.size} here")
            _expect(page_size == local.page_size, f"RAM block '{name}' has page size {page_size} on the source "
                                                  f"but {local.page_size} here")
            self._blocks.append(local)
        missing = sorted(set(self.local) - seen)
        _expect(not missing, f"this host has RAM block '{missing[0]}', which the source does not send"
                if missing else "")

    # -- sections ----------------------------------------------------------------

    def _verify(self, what: str, buffers: list[Any]) -> None:
        """Read a section's framing checksum and compare it with its bytes (x-checksums)."""
        if not matches(buffers, self._recv(TRAILER.size, f"{what}'s checksum")):
            raise StreamError(f"{what} failed its checksum (at stream byte {self.channel.bytes_received}): the "
                              "stream was corrupted on the way")

    def _meta(self, section: Section, covered: bytes = b"") -> Any:
        rest = self._recv(META_HEADER.size - 1, "a section header")
        (length,) = META_HEADER.unpack(bytes([section]) + rest)[1:]
        if length > MAX_META_BYTES:
            raise StreamError(f"{section.name} section of {length} bytes exceeds the {MAX_META_BYTES >> 20} MiB "
                              "limit")
        payload = self._recv(length, "a metadata section")
        if self.checksums:
            self._verify(f"a {section.name} section", [covered, bytes([section]), rest, payload])
        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:  # TypeError: a map keyed by a list
            raise StreamError(f"corrupt {section.name} section: {e}") from None

    def next(self) -> Item:
        """Read and apply the next section."""
        (raw,) = self._recv(1, "a section type")
        try:
            section = Section(raw)
        except ValueError:
            raise StreamError(f"unknown section type {raw:#04x} at stream byte "
                              f"{self.channel.bytes_received - 1}") from None
        if section is Section.PAGES:
            return self._pages()
        if section is Section.END:
            if self.checksums:
                self._verify("the end marker", [bytes([raw])])
            return End()
        _expect(section is not Section.BLOCKS, "a second block list in the stream")
        obj = self._meta(section)
        if section in (Section.DEVICE, Section.DEVICE_PART):
            _expect(isinstance(obj, list) and len(obj) == 4 and isinstance(obj[0], str)
                    and isinstance(obj[1], int) and isinstance(obj[2], int) and isinstance(obj[3], bytes),
                    f"corrupt {section.name} section")
            cls = DeviceSection if section is Section.DEVICE else DevicePart
            return cls(obj[0], obj[1], obj[2], obj[3])
        if section is Section.COMMAND:
            _expect(isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int), "corrupt COMMAND section")
            try:
                return CommandReceived(Command(obj[0]), obj[1])
            except ValueError:
                raise StreamError(f"unknown command {obj[0]}") from None
        if section is Section.MAPPED_RAM:
            if not self.channel.seekable:  # a pipe or a socket: mapped-ram's regions are found by offset
                raise StreamError("the stream has a MAPPED_RAM section, but the incoming channel cannot seek: "
                                  "mapped-ram needs a regular file")
            end = self.channel.tell()
            try:
                layout = mapped_ram.parse(obj, self._blocks, end)
            except ValueError as e:
                raise StreamError(str(e)) from None
            return layout
        _expect(isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], int), "corrupt PASS section")
        return PassEnd(obj[0])

    def _pages(self) -> PagesReceived:
        rest = self._recv(PAGES_HEADER.size - 1, "a PAGES section header")
        _, enc, index, count = PAGES_HEADER.unpack(bytes([Section.PAGES]) + rest)
        try:
            encoding = PageEncoding(enc)
        except ValueError:
            raise StreamError(f"unknown page encoding {enc}") from None
        # the checks of this hot path build their messages only when they fail
        if index >= len(self._blocks):
            raise StreamError(f"page batch for block index {index}, but the source listed {len(self._blocks)} "
                              "blocks")
        block = self._blocks[index]
        if not 0 < count <= MAX_BATCH_PAGES:
            raise StreamError(f"page batch of {count} pages (allowed: 1 to {MAX_BATCH_PAGES})")
        nbytes = count * block.page_size
        if encoding is not PageEncoding.ZERO and nbytes > MAX_BATCH_BYTES:
            raise StreamError(f"page batch of {nbytes} bytes exceeds the {MAX_BATCH_BYTES >> 20} MiB limit")
        framing: list[Any] = [bytes([Section.PAGES]), rest]  # what the framing checksum covers
        if count == 1:  # a single page (a postcopy request): no array work to read its index
            raw1 = self._recv(8, "a page batch's offsets")
            framing.append(raw1)
            (first,) = _U64.unpack(raw1)
            if first >= block.npages:
                raise StreamError(f"page batch for RAM block '{block.name}' names page {first}, beyond its "
                                  f"{block.npages} pages")
            pages = np.array([first], dtype=np.int64)
        else:
            raw = np.empty(count, dtype="<u8")
            self._recv_into(raw, "a page batch's offsets")
            framing.append(raw)
            _expect(bool((raw < block.npages).all()), f"page batch for RAM block '{block.name}' names page "
                                                      f"{int(raw.max())}, beyond its {block.npages} pages")
            pages = raw.astype(np.int64)
        if encoding is PageEncoding.ZERO:
            if self.checksums:
                self._verify("a page batch", framing)
                self.suspects.clear(block, pages)
            self.placer.place_zero(block, pages)
            return PagesReceived(block, pages, encoding)
        if encoding is PageEncoding.XBZRLE:
            _expect(self.placer.reads_back, f"XBZRLE pages for RAM block '{block.name}' during postcopy (they "
                                            "need the previous contents, which postcopy pages never have)")
            lengths = np.empty(count, dtype="<u2")
            self._recv_into(lengths, "a page batch's XBZRLE lengths")
            _expect(bool((lengths <= block.page_size).all()), "Failed to load XBZRLE page - len overflow!")
            payload = self._recv(int(lengths.sum()), "a page batch's XBZRLE data")
            if self.checksums:  # the encodings were private copies on the source: no race to allow for
                self._verify("an XBZRLE page batch", [*framing, lengths, payload])
                self.suspects.clear(block, pages)
            current = block.pages[pages]  # a copy: the encodings apply on top of what this host holds
            pos = 0
            for i, n in enumerate(lengths.tolist()):
                try:
                    xbzrle.decode(payload[pos:pos + n], current[i])
                except ValueError as e:
                    raise StreamError(str(e)) from None
                pos += n
            self.placer.place(block, pages, current)
            return PagesReceived(block, pages, encoding)
        direct = self.placer.direct_view(block, pages)
        if direct is not None:
            self._recv_into(direct, "a page batch's data")
            if self.checksums:
                self._check_pages(block, pages, framing, None)
            self.placer.place(block, pages, None)
        else:
            if self._staging.nbytes < nbytes:
                self._staging = np.empty(nbytes, dtype=np.uint8)
            data = self._staging[:nbytes]
            self._recv_into(data, "a page batch's data")
            rows = data.reshape(count, block.page_size)
            if self.checksums:
                self._check_pages(block, pages, framing, rows)
            self.placer.place(block, pages, rows)
        return PagesReceived(block, pages, encoding)

    def _check_pages(self, block: RAMBlock, pages: np.ndarray, framing: list[Any], rows: np.ndarray | None) -> None:
        """The batch's framing checksum, then each page's (a failed page is suspect: see checksum's module)."""
        self._verify("a page batch", framing)
        expected = np.empty(len(pages), dtype="<u8")
        self._recv_into(expected, "a page batch's page checksums")
        self.suspects.check(block, pages, expected, rows)

    def __iter__(self) -> Iterator[Item]:
        """Every section up to and including the end marker."""
        while True:
            item = self.next()
            yield item
            if isinstance(item, End):
                return
