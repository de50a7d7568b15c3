"""zstd for multifd: one persistent zstd stream per channel, block-flushed at every packet (as QEMU)."""

from __future__ import annotations

import zstandard

from mig_core.ext.compressor import Compressor, Decoder, Encoder, FlushedStreamEncoder

__all__ = ["ZstdCompressor"]


class _ZstdDecoder(Decoder):
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            out = self._d.decompress(data)  # takes any buffer: no copy of the packet first
        except zstandard.ZstdError as e:
            raise ValueError(f"corrupt zstd packet: {e}") from None
        if len(out) != size:
            raise ValueError(f"zstd packet decompressed to {len(out)} bytes, expected {size}")
        return out


class ZstdCompressor(Compressor):
    """multifd-compression=zstd at multifd-zstd-level."""

    name = "zstd"
    level_parameter = "multifd-zstd-level"

    def encoder(self, level: int) -> Encoder:
        return FlushedStreamEncoder(zstandard.ZstdCompressor(level=level).compressobj(),
                                    zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def decoder(self) -> Decoder:
        return _ZstdDecoder()
