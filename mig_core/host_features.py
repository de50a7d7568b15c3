"""What this host's kernel offers for postcopy and background snapshots (userfaultfd probe)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

_SYS_USERFAULTFD = 323  # x86_64
_USERFAULTFD_IOC_NEW = 0xAA00
_UFFDIO_API = 0xC018AA3F
_UFFD_API = 0xAA

FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15

_libc = ctypes.CDLL(None, use_errno=True)


def _new_uffd() -> int:
    """Create a userfaultfd as QEMU does: /dev/userfaultfd first, then the syscall.

    When both fail, the syscall's error is the one reported (the device is often
    simply absent or inaccessible; the syscall says why the kernel refuses).
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        dev = -1
    if dev >= 0:
        try:
            fd = _libc.ioctl(dev, _USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(dev)
        if fd >= 0:
            return fd
    fd = _libc.syscall(_SYS_USERFAULTFD, flags)
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


@functools.cache
def uffd_features() -> int:
    """The userfaultfd feature bits the kernel supports; raises OSError if userfaultfd is unusable."""
    fd = _new_uffd()
    try:
        buf = ctypes.create_string_buffer(struct.pack("QQQ", _UFFD_API, 0, 0), 24)
        if _libc.ioctl(fd, _UFFDIO_API, buf) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return struct.unpack("QQQ", buf.raw)[1]
    finally:
        os.close(fd)


def postcopy_unsupported() -> str | None:
    """Why postcopy cannot work here, worded as QEMU's reasons; None when it can."""
    try:
        feats = uffd_features()
    except OSError as e:
        return f"Userfaultfd not available: {os.strerror(e.errno or errno.ENOSYS)}"
    missing = FEATURE_MISSING_SHMEM & ~feats
    return f"Missing userfault map features: {missing:x}" if missing else None


def background_snapshot_unsupported() -> str | None:
    """Why write-protect snapshots cannot work here; None when they can."""
    try:
        feats = uffd_features()
    except OSError as e:
        return os.strerror(e.errno or errno.ENOSYS)
    need = FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED
    return None if feats & need == need else f"missing userfaultfd features {need & ~feats:#x}"
