"""multifd-compression=uadk: every page zlib-compressed on its own, framed as QEMU's uadk method.

QEMU uses the UADK library's "zlib" algorithm on HiSilicon accelerators and,
without one, sends every page raw. mig compresses in software instead (ISA-L's
zlib-compatible deflate, which releases the GIL) and decodes both compressed
and raw pages, so it reads either kind of sender. ``detect()`` looks for the
UADK libraries (ctypes) and uacce devices and says which path runs.
"""

from __future__ import annotations

from isal import isal_zlib

from mig_core.ext.compressor import Compressor, Decoder, Encoder, PageFramedDecoder, PageFramedEncoder
from mig_core.host.accelerator import AcceleratorProbe, probe

__all__ = ["UadkCompressor", "UadkSupport", "detect"]

#: accelerator queues exported by the uacce driver; MIG_UADK_DEVICES overrides the pattern
UACCE_DEVICES = "/sys/class/uacce/*"


class UadkSupport(AcceleratorProbe):
    """What was found, and which path that means."""

    @property
    def implementation(self) -> str:
        return self.describe("software (ISA-L zlib)", "UADK library (libwd_comp)", "UADK device",
                             "mig has no UADK bindings")


def detect() -> UadkSupport:
    """Look for the library and devices (nothing is required: the software path always works)."""
    found = probe("wd_comp", UACCE_DEVICES, "MIG_UADK_DEVICES")
    return UadkSupport(found.library, found.devices)


class _Encoder(PageFramedEncoder):
    def compress_page(self, page: memoryview) -> bytes | None:
        return isal_zlib.compress(page, level=1, wbits=15)


class _Decoder(PageFramedDecoder):
    def decompress_page(self, data: memoryview) -> bytes:
        try:
            return isal_zlib.decompress(data, wbits=15, bufsize=self.page_size)
        except isal_zlib.error as e:  # type: ignore[misc]  # isal's stub: an instance, not a class
            raise ValueError(f"corrupt uadk page: {e}") from None


class UadkCompressor(Compressor):
    """uadk at its fixed level 1."""

    name = "uadk"

    @classmethod
    def implementation(cls) -> str:
        return detect().implementation

    def encoder(self, level: int) -> Encoder:
        return _Encoder(self.page_size)

    def decoder(self) -> Decoder:
        return _Decoder(self.page_size)
