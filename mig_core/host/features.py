"""What this host's kernel offers for postcopy and background snapshots (a userfaultfd probe)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from mig_core.host import uffd


@functools.cache
def uffd_features() -> int:
    """The userfaultfd feature bits the kernel supports; raises OSError if userfaultfd is unusable."""
    fd = uffd.open_uffd()
    try:
        return uffd.api_handshake(fd, 0)
    finally:
        os.close(fd)


def postcopy_unsupported() -> str | None:
    """Why postcopy cannot work here, worded as QEMU's reasons; None when it can."""
    try:
        feats = uffd_features()
    except OSError as e:
        return f"Userfaultfd not available: {os.strerror(e.errno or errno.ENOSYS)}"
    missing = uffd.FEATURE_MISSING_SHMEM & ~feats
    return f"Missing userfault map features: {missing:x}" if missing else None


def background_snapshot_unsupported() -> str | None:
    """Why write-protect snapshots cannot work here; None when they can."""
    try:
        feats = uffd_features()
    except OSError as e:
        return os.strerror(e.errno or errno.ENOSYS)
    need = uffd.FEATURE_PAGEFAULT_FLAG_WP | uffd.FEATURE_WP_UNPOPULATED
    return None if feats & need == need else f"missing userfaultfd features {need & ~feats:#x}"


#: statfs f_type of the filesystems whose pages userfaultfd serves in missing mode (shmem, hugetlbfs)
_TMPFS_MAGIC = 0x01021994
_HUGETLBFS_MAGIC = 0x958458F6


def missing_mode_filesystem(path: str) -> bool:
    """Whether userfaultfd can serve missing pages of a file at ``path`` (tmpfs or hugetlbfs)."""
    buf = ctypes.create_string_buffer(120)  # struct statfs: f_type (a long) comes first
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") in (_TMPFS_MAGIC, _HUGETLBFS_MAGIC)
