"""zlib for multifd: one persistent deflate stream per channel, sync-flushed at every packet (as QEMU)."""

from __future__ import annotations

import zlib

from mig_core.ext.compressor import Compressor, Decoder, Encoder, FlushedStreamEncoder

__all__ = ["ZlibCompressor"]


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
        return FlushedStreamEncoder(zlib.compressobj(level), zlib.Z_SYNC_FLUSH)

    def decoder(self) -> Decoder:
        return _ZlibDecoder()
