"""multifd-compression=qpl: every page raw DEFLATE (RFC 1951) on its own, framed as QEMU's qpl method.

QEMU drives Intel QPL, with the IAA accelerator when there is one. The format
is plain raw deflate per page, so ISA-L (the ``isal`` package, which releases
the GIL) produces and reads the same bytes in software. ``detect()`` looks for
libqpl (ctypes) and IAA work queues and says which path runs; mig has no QPL
job bindings, so even with both present the ISA-L path is used (and says so).
"""

from __future__ import annotations

from isal import isal_zlib

from mig_core.ext.compressor import Compressor, Decoder, Encoder, PageFramedDecoder, PageFramedEncoder
from mig_core.host.accelerator import AcceleratorProbe, probe

__all__ = ["QplCompressor", "QplSupport", "detect"]


#: where IAA work queues appear (idxd driver); MIG_QPL_DEVICES overrides the pattern
IAA_DEVICES = "/dev/iax/wq*"


class QplSupport(AcceleratorProbe):
    """What was found, and which path that means."""

    @property
    def implementation(self) -> str:
        return self.describe("software (ISA-L)", "libqpl", "IAA work queue(s)", "mig has no QPL job bindings")


def detect() -> QplSupport:
    """Look for the library and devices (nothing is required: the software path always works)."""
    found = probe("qpl", IAA_DEVICES, "MIG_QPL_DEVICES")
    return QplSupport(found.library, found.devices)


class _Encoder(PageFramedEncoder):
    def compress_page(self, page: memoryview) -> bytes | None:
        # QEMU's QPL output buffer is page_size - 1: anything longer goes raw
        out = isal_zlib.compress(page, level=1, wbits=-15)
        return out if len(out) < self.page_size else None


class _Decoder(PageFramedDecoder):
    def decompress_page(self, data: memoryview) -> bytes:
        try:
            return isal_zlib.decompress(data, wbits=-15, bufsize=self.page_size)
        except isal_zlib.error as e:  # type: ignore[misc]  # isal's stub: an instance, not a class
            raise ValueError(f"corrupt qpl page: {e}") from None


class QplCompressor(Compressor):
    """qpl at its fixed level (QEMU ignores the level for qpl too)."""

    name = "qpl"

    @classmethod
    def implementation(cls) -> str:
        return detect().implementation

    def encoder(self, level: int) -> Encoder:
        return _Encoder(self.page_size)

    def decoder(self) -> Decoder:
        return _Decoder(self.page_size)
