"""multifd-compression=lz4: each packet compressed as one LZ4 block (python-lz4 releases the GIL)."""

from __future__ import annotations

import lz4.block

from mig_core.ext.compressor import Compressor, Decoder, Encoder


class _Lz4(Encoder, Decoder):
    def compress(self, data: bytes | memoryview) -> bytes:
        return lz4.block.compress(data, mode="fast", store_size=False)

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            out = lz4.block.decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"corrupt lz4 packet: {e}") from None
        if len(out) != size:
            raise ValueError(f"lz4 packet decompressed to {len(out)} bytes, expected {size}")
        return out


class Lz4Compressor(Compressor):
    """A compression method QEMU does not have: a name mig accepts because this plugin registers it."""

    name = "lz4"

    def encoder(self, level: int) -> Encoder:
        return _Lz4()

    def decoder(self) -> Decoder:
        return _Lz4()
