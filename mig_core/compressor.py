"""The compressor extension point (``mig_core.compressors``) and the built-in ``none``.

A compressor is chosen by the ``multifd-compression`` parameter. Each multifd
channel gets its own encoder/decoder pair, so a method may keep a persistent
stream per channel (zlib, zstd) and flush it at every packet.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar


class Encoder(ABC):
    """Compresses the packets of one channel, in order."""

    @abstractmethod
    def compress(self, data: bytes | memoryview) -> bytes:
        """Compress one packet's payload so that the peer can decode it on its own arrival."""


class Decoder(ABC):
    """Decompresses the packets of one channel, in order."""

    @abstractmethod
    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        """Return exactly ``size`` bytes or raise ValueError for a corrupt packet."""


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
