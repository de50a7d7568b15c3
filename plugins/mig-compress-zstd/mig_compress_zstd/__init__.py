"""zstd for multifd: every packet one zstd frame, compressed into a reused buffer and decompressed
straight into its pages.

libzstd's C API, reached through ``zstandard``'s cffi backend, does what the Python stream objects cannot:
it takes the output buffer from the caller. The stream objects hand each
packet's output back as a new bytes object, and on incompressible data (stored blocks) those copies cost
more than the compression itself (measured for issue 21: two extra copies per byte, one on each side).
cffi releases the GIL for the length of each call, so the channels compress in parallel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mig_core.ext.compressor import Compressor, Decoder, Encoder, IntoDecoder, PiecewiseEncoder

__all__ = ["ZstdCompressor"]

try:
    from zstandard.backend_cffi import ffi, lib  # type: ignore[attr-defined]
except ImportError as e:  # pragma: no cover - cffi is a dependency of this distribution
    raise ImportError(f"mig-compress-zstd needs zstandard's cffi backend (pip install cffi): {e}") from None


def _error_text(code: int) -> str:
    return str(ffi.string(lib.ZSTD_getErrorName(code)).decode())


def _context(create: Any, free: Any) -> Any:
    ctx = create()
    if ctx == ffi.NULL:
        raise MemoryError("zstd could not allocate a context")
    return ffi.gc(ctx, free)


class _ZstdEncoder(PiecewiseEncoder):
    """One compression context per channel; each packet becomes one frame in a buffer reused for the next.

    The pages may be live RAM that a vCPU writes while they are compressed, so the packet goes through
    libzstd's streaming call in its default buffered mode: libzstd copies each 128 KiB block into its own
    window before it searches it, and every match refers to that copy. The one-shot ``ZSTD_compress2``
    reads the caller's buffer in place: a page written between its literals and a later match against it
    made the destination rebuild a page that nobody wrote from the old bytes (a silent loss that
    ``test_multifd_compression[zstd]`` hit about once in 15 runs under load; QEMU's zstd uses the
    streaming call too). The input is fed with ``ZSTD_e_continue`` and the frame ended with no input,
    because ``ZSTD_e_end`` with input and an empty window also compresses in place.
    """

    independent = True

    def __init__(self, level: int) -> None:
        self._cctx = _context(lib.ZSTD_createCCtx, lib.ZSTD_freeCCtx)
        code = lib.ZSTD_CCtx_setParameter(self._cctx, lib.ZSTD_c_compressionLevel, level)
        if lib.ZSTD_isError(code):
            raise ValueError(f"zstd level {level}: {_error_text(code)}")
        # np.empty, not bytearray: a bytearray is zeroed, so its first use wrote and faulted in the whole
        # bound (16 MiB per channel for a 16 MiB job, 0.02 CPU-s per migration), where text-like data
        # writes a few pages of it
        self._out = np.empty(0, dtype=np.uint8)
        self._in = ffi.new("ZSTD_inBuffer *")
        self._outbuf = ffi.new("ZSTD_outBuffer *")

    def compress_parts(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """The frame, as a view of this encoder's buffer (valid until the next call)."""
        src = ffi.from_buffer(data)
        bound = self._reserve(len(src))
        # the size known up front: tables and window sized to the packet, and the frame records it
        self._check(lib.ZSTD_CCtx_setPledgedSrcSize(self._cctx, len(src)))
        out, inp = self._outbuf, self._in
        out.dst, out.size, out.pos = ffi.from_buffer(self._out), bound, 0
        inp.src, inp.size, inp.pos = src, len(src), 0
        try:
            while inp.pos < inp.size:  # each call copies up to a block into the window and compresses it
                self._check(lib.ZSTD_compressStream2(self._cctx, out, inp, lib.ZSTD_e_continue))
            inp.src, inp.size, inp.pos = ffi.NULL, 0, 0
            while self._check(lib.ZSTD_compressStream2(self._cctx, out, inp, lib.ZSTD_e_end)):
                pass  # the output holds the bound, so one call ends the frame; a retry costs nothing
        except ValueError:
            lib.ZSTD_CCtx_reset(self._cctx, lib.ZSTD_reset_session_only)  # the next packet starts a new frame
            raise
        return [self._out.data[:out.pos]]

    def compress_parts_stable(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """The frame of ``data`` that nothing writes during the call: one ``ZSTD_compress2``, which matches
        against ``data`` in place and skips the window copy (20 % of a sender's time on text-like data,
        issue 21). The same frame format; the decoder cannot tell the two apart."""
        src = ffi.from_buffer(data)
        bound = self._reserve(len(src))
        n = lib.ZSTD_compress2(self._cctx, ffi.from_buffer(self._out), bound, src, len(src))
        if lib.ZSTD_isError(n):
            lib.ZSTD_CCtx_reset(self._cctx, lib.ZSTD_reset_session_only)
            raise ValueError(f"zstd compression failed: {_error_text(n)}")
        return [self._out.data[:n]]

    def _reserve(self, size: int) -> int:
        """The compress bound of ``size`` input bytes, the output buffer grown to hold it."""
        bound = lib.ZSTD_compressBound(size)
        if len(self._out) < bound:
            self._out = np.empty(bound, dtype=np.uint8)
        return int(bound)

    @staticmethod
    def _check(code: int) -> int:
        if lib.ZSTD_isError(code):
            raise ValueError(f"zstd compression failed: {_error_text(code)}")
        return code


class _ZstdDecoder(IntoDecoder):
    """Decodes each packet's frame straight into the memory it is for."""

    def __init__(self) -> None:
        self._dctx = _context(lib.ZSTD_createDCtx, lib.ZSTD_freeDCtx)

    def decompress_into(self, data: bytes | memoryview, out: memoryview) -> None:
        dst = ffi.from_buffer(out, require_writable=True)
        got = lib.ZSTD_decompressDCtx(self._dctx, dst, len(dst), ffi.from_buffer(data), memoryview(data).nbytes)
        if lib.ZSTD_isError(got):
            raise ValueError(f"corrupt zstd packet: {_error_text(got)}")
        if got != len(dst):
            raise ValueError(f"zstd packet decompressed to {got} bytes, expected {len(dst)}")


class ZstdCompressor(Compressor):
    """multifd-compression=zstd at multifd-zstd-level (0: zstd's default level)."""

    name = "zstd"
    level_parameter = "multifd-zstd-level"

    def encoder(self, level: int) -> Encoder:
        return _ZstdEncoder(level)

    def decoder(self) -> Decoder:
        return _ZstdDecoder()
