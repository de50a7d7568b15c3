"""zlib for multifd: one persistent deflate stream per channel, sync-flushed at every packet (as QEMU)."""

from __future__ import annotations

import zlib

from mig_core.compressor import Compressor, Decoder, Encoder

__all__ = ["ZlibCompressor"]


class _ZlibEncoder(Encoder):
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level)

    def compress(self, data: bytes | memoryview) -> bytes:
        return b"".join(self.compress_parts(data))

    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """What the stream emits for ``data``, then what the sync flush at the packet's end emits (no join)."""
        return [b for b in (self._c.compress(data), self._c.flush(zlib.Z_SYNC_FLUSH)) if b]


class _ZlibDecoder(Decoder):
    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            out = self._d.decompress(data, size + 1)
        except zlib.error as e:
            raise ValueError(f"corrupt zlib packet: {e}") from None
        if len(out) != size or self._d.unconsumed_tail:
            raise ValueError(f"zlib packet decompressed to {len(out)} bytes, expected {size}")
        return out


class ZlibCompressor(Compressor):
    """multifd-compression=zlib at multifd-zlib-level."""

    name = "zlib"
    level_parameter = "multifd-zlib-level"

    def encoder(self, level: int) -> Encoder:
        return _ZlibEncoder(level)

    def decoder(self) -> Decoder:
        return _ZlibDecoder()
