"""The compressor extension point (``mig_core.compressors``) and the built-in ``none``.

A compressor is chosen by the ``multifd-compression`` parameter. Each multifd
channel gets its own encoder/decoder pair, so a method may keep a persistent
stream per channel (zlib, zstd) and flush it at every packet.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

if TYPE_CHECKING:
    from mig_core.plugin.registry import PluginRegistry

log = structlog.get_logger("mig.compressor")

#: The entry-point group of compressor plugins (key: a MultiFDCompression value or a new name).
GROUP = "mig_core.compressors"


class Encoder(ABC):
    """Compresses the packets of one channel, in order."""

    #: Each packet decodes on its own (no state carried from one packet to the next). The multifd sender
    #: then sends a packet's pages as they are wherever compressing them would not make them smaller
    #: (see ``mig_core.engine.multifd_send``); a stream encoder must see every packet and keeps False.
    independent: ClassVar[bool] = False

    @abstractmethod
    def compress(self, data: bytes | memoryview) -> bytes:
        """Compress one packet's payload so that the peer can decode it on its own arrival.

        ``data`` may be live RAM that a vCPU writes meanwhile (the page is then dirty and sent again): read
        each byte once, from a copy (your own, or a codec's that buffers its input), never match against
        ``data`` in place, or a page written meanwhile corrupts pages nobody wrote
        (``CompressorContract.test_pages_written_meanwhile_leave_the_others_intact``)."""

    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """``compress`` as buffers to send one after the other (what the multifd channels call).

        An encoder whose output comes in pieces overrides this and skips joining them: a second
        live packet-sized buffer makes the allocator give memory back and fault it in again for
        every packet (measured: two page faults per 4 KiB page compressed). The buffers are sent
        before the next call, so they may be views of ``data``.
        """
        return [self.compress(data)]

    def compress_parts_stable(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """``compress_parts`` for ``data`` that nothing writes during the call, so the codec may read it in
        place (zstd's one-shot call, without the window copy that streaming makes).

        The multifd sender calls it for a private copy, and for live RAM only where the dirty tracker can
        prove afterwards that no page of ``data`` was written meanwhile (``DirtyTracker.unwritten_since``);
        it discards the result and calls ``compress_parts`` where it cannot. Default: ``compress_parts``."""
        return self.compress_parts(data)


class PiecewiseEncoder(Encoder):
    """An encoder whose output comes in pieces: it implements ``compress_parts``; ``compress`` joins them."""

    @abstractmethod
    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]: ...

    def compress(self, data: bytes | memoryview) -> bytes:
        return b"".join(self.compress_parts(data))


class FlushedStreamEncoder(PiecewiseEncoder):
    """One persistent stream per channel, flushed at the end of every packet (QEMU's zlib and zstd).

    ``stream`` is a compression object with ``compress(data)`` and ``flush(mode)`` (``zlib.compressobj``,
    ``zstandard``'s ``compressobj``); ``flush_mode`` ends a packet without ending the stream.
    """

    def __init__(self, stream: Any, flush_mode: int) -> None:
        self._stream = stream
        self._flush_mode = flush_mode

    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """What the stream emits for ``data``, then what the flush emits (not joined)."""
        return [b for b in (self._stream.compress(data), self._stream.flush(self._flush_mode)) if b]


class Decoder(ABC):
    """Decompresses the packets of one channel, in order."""

    @abstractmethod
    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        """Return exactly ``size`` bytes or raise ValueError for a corrupt packet.

        ``data`` may be a view of a buffer the channel reuses for its next packet: keep no reference.
        """

    def decompress_into(self, data: bytes | memoryview, out: memoryview) -> None:
        """Decode into ``out`` (a writable byte view: exactly its size, else ValueError).

        The multifd receiver passes the pages' own memory where they are contiguous, so a codec that
        writes into a given buffer skips a copy per byte; this default copies ``decompress``'s result.
        """
        out[:] = memoryview(self.decompress(data, out.nbytes)).cast("B")


class IntoDecoder(Decoder):
    """A decoder that writes into a given buffer: it implements ``decompress_into``; ``decompress`` fills a
    new buffer with it (the zlib and zstd plugins)."""

    @abstractmethod
    def decompress_into(self, data: bytes | memoryview, out: memoryview) -> None: ...

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        out = bytearray(size)
        self.decompress_into(data, memoryview(out))
        return bytes(out)


class Compressor(ABC):
    """One compression method; subclasses are what entry points in ``mig_core.compressors`` name."""

    #: The ``multifd-compression`` value this method serves.
    name: ClassVar[str]
    #: The parameter holding its level, if any (e.g. ``multifd-zlib-level``).
    level_parameter: ClassVar[str | None] = None

    def __init__(self, page_size: int = 4096) -> None:
        #: the target page size: packets hold whole pages, and per-page formats (qpl, uadk) need it
        self.page_size = page_size

    @classmethod
    def implementation(cls) -> str:
        """Which code path is active (e.g. ``hardware``, ``software``); shown by ``mig plugins``."""
        return "software"

    @abstractmethod
    def encoder(self, level: int) -> Encoder: ...

    @abstractmethod
    def decoder(self) -> Decoder: ...


class _Identity(Encoder, Decoder):
    independent = True

    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        if len(data) != size:
            raise ValueError(f"uncompressed packet holds {len(data)} bytes, expected {size}")
        return bytes(data)


class NoCompression(Compressor):
    """Pages travel as they are."""

    name = "none"

    def encoder(self, level: int) -> Encoder:
        return _Identity()

    def decoder(self) -> Decoder:
        return _Identity()


class PageFramedEncoder(PiecewiseEncoder):
    """Each page compressed on its own, framed as QEMU's qpl and uadk methods frame them.

    Payload: one big-endian u32 length per page, then each page's data; a page whose
    compressed form would not be shorter than the page travels raw, with length = page size.
    Subclasses compress one page in ``compress_page`` (None = did not fit).
    """

    independent = True

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        # each page is compressed from a copy: a vCPU may write the page meanwhile, and a codec that
        # reads its input twice (data, then checksum) would emit a page that fails its own check
        self._stable = memoryview(bytearray(page_size))

    @abstractmethod
    def compress_page(self, page: memoryview) -> bytes | None: ...

    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """The length table, then the pages' data: consecutive raw pages as one view of ``data``,
        consecutive compressed pages joined (they are small), so a packet is a few buffers."""
        view = memoryview(data).cast("B")
        ps = self.page_size
        lengths: list[int] = []
        parts: list[bytes | memoryview] = []
        packed: list[bytes] = []  # compressed pages since the last raw run
        raw_from = -1  # where the current run of raw pages started
        stable = self._stable
        for off in range(0, view.nbytes, ps):
            stable[:] = view[off:off + ps]
            out = self.compress_page(stable)
            if out is None or len(out) >= ps:
                lengths.append(ps)
                if packed:
                    parts.append(b"".join(packed))
                    packed = []
                if raw_from < 0:
                    raw_from = off
            else:
                lengths.append(len(out))
                if raw_from >= 0:
                    parts.append(view[raw_from:off])
                    raw_from = -1
                packed.append(out)
        if packed:
            parts.append(b"".join(packed))
        if raw_from >= 0:
            parts.append(view[raw_from:])
        return [struct.pack(f">{len(lengths)}I", *lengths), *parts]


class PageFramedDecoder(Decoder):
    """The receiving side of ``PageFramedEncoder``: checks every length, copies raw pages as they are."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    @abstractmethod
    def decompress_page(self, data: memoryview) -> bytes:
        """Decode one page or raise ValueError."""

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        ps = self.page_size
        if size % ps:
            raise ValueError(f"packet of {size} bytes is not a whole number of {ps}-byte pages")
        n = size // ps
        view = memoryview(data).cast("B")
        if view.nbytes < 4 * n:
            raise ValueError(f"packet of {view.nbytes} bytes is too short for {n} page lengths")
        lengths = struct.unpack_from(f">{n}I", view)
        pos = 4 * n
        pages: list[bytes | memoryview] = []
        for i, length in enumerate(lengths):
            if length == 0 or length > ps or pos + length > view.nbytes:
                raise ValueError(f"page {i} of the packet has a bad length {length}")
            chunk = view[pos:pos + length]
            page = chunk if length == ps else self.decompress_page(chunk)
            if len(page) != ps:
                raise ValueError(f"page {i} of the packet decompressed to {len(page)} bytes, expected {ps}")
            pages.append(page)
            pos += length
        if pos != view.nbytes:
            raise ValueError(f"packet has {view.nbytes - pos} bytes after its last page")
        return b"".join(pages)  # one allocation, raw pages copied once


def load(registry: PluginRegistry, name: str, page_size: int) -> Compressor:
    """The compressor serving ``name`` for pages of ``page_size``, ready to make encoders and decoders.

    Logs which class and distribution serve the name (``extension_selected``) and which code path the
    instance uses (``compressor_ready``: hardware or software). ``PluginNotFound`` naming the group and
    the name if nothing can serve it."""
    comp = registry.load_class(GROUP, name, Compressor)(page_size=page_size)
    log.info("compressor_ready", method=name, implementation=comp.implementation())
    return comp
