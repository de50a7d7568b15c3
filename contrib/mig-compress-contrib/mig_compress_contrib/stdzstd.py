"""A second implementation of multifd-compression=zstd, on the standard library's zstd module.

Python 3.14 has ``compression.zstd``; older ones get the same API from ``backports.zstd``. Each
packet is one ordinary zstd frame, as mig-compress-zstd writes them, so either end may use either
implementation.
"""

from __future__ import annotations

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

from mig_core.ext.compressor import Compressor, Decoder, Encoder


class _Encoder(Encoder):
    independent = True  # a frame per packet: mig may send a packet that would not shrink as it is

    def __init__(self, level: int) -> None:
        self._c = zstd.ZstdCompressor(level=level)

    def compress(self, data: bytes | memoryview) -> bytes:
        return self._c.compress(data, mode=zstd.ZstdCompressor.FLUSH_FRAME)


class _Decoder(Decoder):
    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            out = zstd.decompress(bytes(data))
        except zstd.ZstdError as e:
            raise ValueError(f"corrupt zstd packet: {e}") from None
        if len(out) != size:
            raise ValueError(f"zstd packet decompressed to {len(out)} bytes, expected {size}")
        return out


class StdlibZstdCompressor(Compressor):
    """zstd at multifd-zstd-level, through the standard library's zstd bindings."""

    name = "zstd"
    level_parameter = "multifd-zstd-level"

    @classmethod
    def implementation(cls) -> str:
        return f"software ({zstd.__name__}, libzstd {zstd.zstd_version})"

    def encoder(self, level: int) -> Encoder:
        return _Encoder(level)

    def decoder(self) -> Decoder:
        return _Decoder()
