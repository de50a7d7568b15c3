"""userfaultfd: one registry owns every RAM block's registration and arbitrates its mode.

A range can be registered with one userfaultfd in one mode at a time (the
kernel says EBUSY otherwise): write-protect-async for dirty tracking,
missing-page for postcopy, synchronous write-protect for background
snapshots. The registry refuses a second mode with a message naming both, and
turns the kernel's refusals into precise errors.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass

import structlog

from mig_core.errors import MigError
from mig_core.memory.ram import Backing, RAMBlock

log = structlog.get_logger("mig.uffd")

_SYS_USERFAULTFD = 323  # x86_64
_USERFAULTFD_IOC_NEW = 0xAA00
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_WRITEPROTECT = 0xC018AA06
_UFFD_API = 0xAA

REGISTER_MODE_MISSING = 1
REGISTER_MODE_WP = 2

FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
FEATURE_WP_UNPOPULATED = 1 << 13
FEATURE_WP_ASYNC = 1 << 15

_libc = ctypes.CDLL(None, use_errno=True)


class UffdError(MigError, RuntimeError):
    """The kernel refused a userfaultfd operation (or a block cannot serve it); the message says why."""

    def __init__(self, errno_: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def _ioctl(fd: int, request: int, arg: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.ioctl(fd, request, arg) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def open_uffd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new userfaultfd as QEMU makes one: /dev/userfaultfd first, then the syscall.

    When both fail, the syscall's error is reported (the device is often absent
    or inaccessible; the syscall says why the kernel refuses).
    """
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


def api_handshake(fd: int, features: int) -> int:
    """UFFDIO_API (exactly once per fd); returns the features the kernel supports."""
    buf = ctypes.create_string_buffer(struct.pack("QQQ", _UFFD_API, features, 0), 24)
    _ioctl(fd, UFFDIO_API, buf)
    return struct.unpack("QQQ", buf.raw)[1]


class Mode(enum.Enum):
    """What a registration serves."""

    WP_ASYNC = "wp-async"  # dirty tracking: writes are recorded by the kernel, never block
    MISSING = "missing"  # postcopy: a helper process fills pages on fault
    WP_SYNC = "wp-sync"  # background snapshot: a write blocks until the old page is saved

    @property
    def purpose(self) -> str:
        return {"wp-async": "dirty tracking", "missing": "postcopy", "wp-sync": "background snapshot"}[self.value]


_MODE_FEATURES = {
    Mode.WP_ASYNC: FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED,
    Mode.MISSING: FEATURE_MISSING_SHMEM | FEATURE_THREAD_ID,
    Mode.WP_SYNC: FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM,
}
_MODE_REGISTER = {Mode.WP_ASYNC: REGISTER_MODE_WP, Mode.MISSING: REGISTER_MODE_MISSING, Mode.WP_SYNC: REGISTER_MODE_WP}
_MODE_BACKINGS = {
    # the postcopy helper fills pages with UFFDIO_COPY, which acts on this process's memory whoever calls
    # it: any mapping mig made will do; a host's own buffer is refused (mig cannot discard its pages)
    Mode.MISSING: (Backing.MEMFD, Backing.ANONYMOUS, Backing.FILE),
    Mode.WP_SYNC: (Backing.MEMFD, Backing.ANONYMOUS),
    Mode.WP_ASYNC: (Backing.MEMFD, Backing.ANONYMOUS, Backing.FILE, Backing.HOST),
}


@dataclass(eq=False)
class Registration:
    """One block registered with one userfaultfd in one mode; ``fd`` stays open while it exists."""

    block: RAMBlock
    mode: Mode
    fd: int
    features: int
    owner: str

    def writeprotect(self, start: int = 0, length: int | None = None, protect: bool = True) -> None:
        """Set (or clear, waking waiters) write protection on a byte range of the block."""
        length = self.block.size - start if length is None else length
        buf = ctypes.create_string_buffer(struct.pack("QQQ", self.block.address + start, length, 1 if protect else 0),
                                          24)
        try:
            _ioctl(self.fd, UFFDIO_WRITEPROTECT, buf)
        except OSError as e:
            raise UffdError(e.errno, f"UFFDIO_WRITEPROTECT on RAM block '{self.block.name}' failed: "
                                     f"{os.strerror(e.errno or 0)}") from None


class UffdRegistry:
    """The one owner of userfaultfd registrations in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: by id(block): two machines in one process may both have a block of the same name
        self._by_block: dict[int, Registration] = {}

    def registration(self, block: RAMBlock) -> Registration | None:
        return self._by_block.get(id(block))

    def register(self, block: RAMBlock, mode: Mode, owner: str) -> Registration:
        """Register ``block`` for ``mode`` on behalf of ``owner``; refuse a block already registered."""
        block.require(*_MODE_BACKINGS[mode], feature=f"userfaultfd {mode.value} ({mode.purpose})")
        with self._lock:
            held = self._by_block.get(id(block))
            if held is not None:
                raise UffdError(errno.EBUSY, f"RAM block '{block.name}' is already registered with userfaultfd "
                                             f"for {held.mode.value} ({held.mode.purpose}, by {held.owner}); it "
                                             f"cannot also serve {mode.value} ({mode.purpose})")
            try:
                fd = open_uffd()
            except OSError as e:
                raise UffdError(e.errno, f"userfaultfd is not available: {os.strerror(e.errno or 0)}") from None
            try:
                supported = api_handshake(fd, 0)
                wanted = _MODE_FEATURES[mode]
                if wanted & ~supported:
                    raise UffdError(errno.ENOTSUP, f"the kernel lacks userfaultfd features {wanted & ~supported:#x} "
                                                   f"needed for {mode.value} ({mode.purpose})")
                os.close(fd)
                fd = open_uffd()  # UFFDIO_API may be called once per fd: a fresh one enables the features
                api_handshake(fd, wanted)
                buf = ctypes.create_string_buffer(
                    struct.pack("QQQQ", block.address, block.size, _MODE_REGISTER[mode], 0), 32)
                try:
                    _ioctl(fd, UFFDIO_REGISTER, buf)
                except OSError as e:
                    if e.errno == errno.EINVAL and block.backing is Backing.FILE and mode is not Mode.WP_ASYNC:
                        raise UffdError(e.errno, f"RAM block '{block.name}' is backed by {block.path}, on a "
                                                 f"filesystem whose pages userfaultfd cannot serve for "
                                                 f"{mode.purpose} (Host backend files need to be TMPFS or "
                                                 "HUGETLBFS only)") from None
                    raise UffdError(e.errno, f"UFFDIO_REGISTER of RAM block '{block.name}' for {mode.value} failed: "
                                             f"{os.strerror(e.errno or 0)}") from None
            except BaseException:
                os.close(fd)
                raise
            reg = Registration(block, mode, fd, wanted, owner)
            self._by_block[id(block)] = reg
        log.info("uffd_registered", block=block.name, mode=mode.value, owner=owner)
        return reg

    def hand_over(self, reg: Registration) -> None:
        """Close this process's descriptor of a registration another process now holds (a background
        snapshot's fault server): the registration lives exactly as long as that process keeps it. The
        block stays marked as taken until ``unregister``."""
        with self._lock:
            fd, reg.fd = reg.fd, -1
        if fd >= 0:
            os.close(fd)

    def unregister(self, reg: Registration) -> None:
        """Drop a registration (all its write-protect state goes with it) and close its descriptor; one handed
        over is only forgotten here (it ends with the process that holds it)."""
        with self._lock:
            if self._by_block.get(id(reg.block)) is not reg:
                return
            del self._by_block[id(reg.block)]
        if reg.fd < 0:
            log.info("uffd_forgotten", block=reg.block.name, mode=reg.mode.value)
            return
        buf = ctypes.create_string_buffer(struct.pack("QQ", reg.block.address, reg.block.size), 16)
        try:
            _ioctl(reg.fd, UFFDIO_UNREGISTER, buf)
        except OSError as e:
            log.warning("uffd_unregister_failed", block=reg.block.name, error=os.strerror(e.errno or 0))
        finally:
            os.close(reg.fd)
        log.info("uffd_unregistered", block=reg.block.name, mode=reg.mode.value)


class PageFiller:
    """UFFDIO_COPY, UFFDIO_ZEROPAGE and UFFDIO_WAKE on one userfaultfd, from whichever process holds it.

    The ioctls act on the memory of the process that created the descriptor, so a helper process
    fills the host's pages from a buffer of its own. Each call goes through ctypes, which releases
    the GIL while the kernel copies.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._copy = ctypes.create_string_buffer(40)
        self._zero = ctypes.create_string_buffer(32)
        self._wake = ctypes.create_string_buffer(16)

    def copy(self, dst: int, src: int, length: int) -> None:
        """Place ``length`` bytes from ``src`` (this process) at ``dst`` (the host) atomically and wake waiters.

        Pages that were placed already (EEXIST) are skipped: the rest of the range is still filled.
        """
        while length > 0:
            struct.pack_into("QQQQq", self._copy, 0, dst, src, length, 0, 0)
            if _libc.ioctl(self.fd, UFFDIO_COPY, self._copy) == 0:
                return
            err = ctypes.get_errno()
            done = struct.unpack_from("q", self._copy, 32)[0]
            if err == errno.EAGAIN and done > 0:  # the host's mappings changed meanwhile: go on after them
                dst, src, length = dst + done, src + done, length - done
                continue
            if err == errno.EEXIST:
                step = max(done, 0) + mmap.PAGESIZE
                dst, src, length = dst + step, src + step, length - step
                continue
            if err == errno.EAGAIN:
                continue
            raise OSError(err, f"UFFDIO_COPY: {os.strerror(err)}")

    def zeropage(self, start: int, length: int) -> None:
        """Map zero pages over ``[start, start + length)`` and wake waiters (placed pages are skipped)."""
        while length > 0:
            struct.pack_into("QQQq", self._zero, 0, start, length, 0, 0)
            if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, self._zero) == 0:
                return
            err = ctypes.get_errno()
            done = struct.unpack_from("q", self._zero, 24)[0]
            if err in (errno.EAGAIN, errno.EEXIST):
                step = max(done, 0) + (mmap.PAGESIZE if err == errno.EEXIST else 0)
                start, length = start + step, length - step
                continue
            raise OSError(err, f"UFFDIO_ZEROPAGE: {os.strerror(err)}")

    def wake(self, start: int, length: int) -> None:
        """Wake threads waiting on a range whose pages are present already (a duplicate fault)."""
        struct.pack_into("QQ", self._wake, 0, start, length)
        if _libc.ioctl(self.fd, UFFDIO_WAKE, self._wake) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"UFFDIO_WAKE: {os.strerror(err)}")


#: one ``struct uffd_msg`` (x86_64): event, 3 reserved, flags, address, thread id, padding
UFFD_MSG = struct.Struct("<BBHIQQI4x")
UFFD_EVENT_PAGEFAULT = 0x12


#: The registry of this process.
REGISTRY = UffdRegistry()
