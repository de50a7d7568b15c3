"""RAM blocks: named, page-aligned memory that mig allocates (or a host lends) and migrates.

mig allocates anonymous memory by default and asks for transparent huge pages
on it, as QEMU does for guest RAM: copying pages in and out of sockets then
costs fewer TLB misses (measured in docs/benchmarks.md). A memfd (which a
helper process can map) or a file is there on request. Each block records its
backing so that a feature needing a particular one refuses a block that cannot
serve it, with a precise error.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from mig_core.errors import BackingError
from mig_core.memory import pagemap

log = structlog.get_logger("mig.ram")

_MADV_POPULATE_READ = 22  # Linux 5.14
_HUGE = 2 << 20  # a PMD mapping on x86-64 and arm64 with 4 KiB pages
#: 2 MiB windows of a file block's data that ``read_view`` probes for huge mappings
_PROBES = 8
_MADV_POPULATE_WRITE = 23
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
DEFAULT_PAGE_SIZE = mmap.PAGESIZE


class Backing(enum.Enum):
    """Where a block's pages live."""

    MEMFD = "memfd"  # shared memory with a descriptor: can be mapped by a helper process
    ANONYMOUS = "anonymous"  # private memory of this process
    FILE = "file"  # a shared mapping of a regular file
    HOST = "host"  # a buffer the host passed in; mig does not own its mapping


@dataclass(eq=False)
class RAMBlock:
    """One named block of RAM; ``view`` and ``array`` are live, writable views of it."""

    name: str
    size: int
    page_size: int
    backing: Backing
    view: memoryview
    fd: int = -1
    path: Path | None = None
    #: a memfd the host handed in and keeps (it can hand it to the process that replaces this one)
    kept_by_host: bool = False
    _mmap: mmap.mmap | None = field(default=None, repr=False)
    _owner: Any = field(default=None, repr=False)
    #: the read-only second mapping behind ``read_view`` (None: not made yet, or ``view`` serves)
    _read_mmap: mmap.mmap | None = field(default=None, repr=False)
    _read_view: memoryview | None = field(default=None, repr=False)

    @classmethod
    def geometry(cls, name: str, size: int, page_size: int) -> RAMBlock:
        """A block that only describes another process's memory (name, size, page size): it has no view."""
        return cls(name, size, page_size, Backing.HOST, memoryview(b""))

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    @property
    def array(self) -> np.ndarray:
        """The block as a flat uint8 numpy array (no copy)."""
        return np.frombuffer(self.view, dtype=np.uint8)

    @property
    def pages(self) -> np.ndarray:
        """The block as a (npages, page_size) uint8 array (no copy)."""
        return self._rows(self.view, np.uint8)

    @property
    def words(self) -> np.ndarray:
        """The block as a (npages, page_size // 8) uint64 array (no copy): zero tests scan words."""
        return self._rows(self.view, np.uint64)

    def _rows(self, view: memoryview, dtype: type[np.unsignedinteger]) -> np.ndarray:
        """``view`` as one row per page of ``dtype`` items (no copy)."""
        return np.frombuffer(view, dtype=dtype).reshape(self.npages, -1)

    @property
    def read_view(self) -> memoryview:
        """The block's bytes for reading it whole (sending, saving): ``view``, or a read-only second
        mapping of the same file where the kernel maps that one with huge pages.

        A tracker maps a file or memfd block page by page (``map_resident``), so that a write to one page
        is not reported as a write to the 512 around it; reading through 4 KiB mappings then costs a TLB
        miss per page. A second shared mapping of the file, never tracked and never written, gets the page
        cache's large folios as 2 MiB mappings where the file system has them, and reads the same bytes
        (measured for issue 21: a file-backed GiB over one channel in 0.26-0.33 s against 0.33-0.45 s).
        Whether it does is probed once, on a few 2 MiB windows of the file's data; where not, ``view``
        serves."""
        if self._read_view is None:
            self._read_view = self._huge_alias() or self.view
        return self._read_view

    @property
    def read_pages(self) -> np.ndarray:
        """``read_view`` as a read-only (npages, page_size) uint8 array."""
        return self._rows(self.read_view, np.uint8)

    @property
    def read_words(self) -> np.ndarray:
        """``read_view`` as a read-only (npages, page_size // 8) uint64 array: zero tests scan words."""
        return self._rows(self.read_view, np.uint64)

    def release_read_view(self) -> None:
        """Unmap ``read_view``'s second mapping, if there is one (at the end of a migration): while it
        exists the process's RSS counts the block's mapped pages twice (shared pages: PSS does not)."""
        if self._read_mmap is None or self._read_view is None:
            self._read_view = None  # ``view`` served: nothing of its own to unmap
            return
        try:
            self._read_view.release()
        except BufferError:  # a reader still holds an array of it: it stays mapped until the block closes
            log.warning("ram_block_read_mapping_still_exported", block=self.name)
            return
        try:
            self._read_mmap.close()
        except BufferError:
            self._read_view = memoryview(self._read_mmap)  # still mapped: it goes on serving
            log.warning("ram_block_read_mapping_still_exported", block=self.name)
            return
        self._read_mmap = self._read_view = None

    def _huge_alias(self) -> memoryview | None:
        """A read-only shared mapping of this block's file, if most of its data is mapped with huge pages
        there: probed on up to ``_PROBES`` 2 MiB windows spread over the data (a file's first megabytes
        often sit in small folios, its readahead having started small)."""
        if self.fd < 0 or self.backing not in (Backing.FILE, Backing.MEMFD) or self._mmap is None:
            return None
        windows = self._data_windows(_HUGE)
        if not len(windows):
            return None  # no 2 MiB of data: nothing a huge mapping would speed up
        # sorted(set()), not np.unique: numpy 2's first unique() imports numpy.ma, 6 ms in the migration thread
        probes = windows[sorted({int(i) for i in np.linspace(0, len(windows) - 1, min(_PROBES, len(windows)))})]
        alias = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        view = memoryview(alias)
        address = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        try:
            huge = 0
            for offset in probes.tolist():
                alias.madvise(_MADV_POPULATE_READ, offset, _HUGE)
                huge += len(pagemap.scanner().scan(address + offset, _HUGE, _HUGE, anyof_mask=pagemap.PAGE_IS_HUGE,
                                                   return_mask=pagemap.PAGE_IS_HUGE)) > 0
        except OSError:  # before Linux 6.7 (PAGEMAP_SCAN) or 5.14 (MADV_POPULATE_READ): no way to know
            huge = 0
        used = 2 * huge > len(probes)
        log.info("ram_block_read_mapping", block=self.name, huge_windows=huge, probed=len(probes), used=used)
        if not used:
            view.release()
            alias.close()
            return None
        self._read_mmap = alias
        return view

    def _data_windows(self, size: int) -> np.ndarray:
        """Offsets of the ``size``-aligned windows of ``size`` bytes that hold file data only."""
        parts = []
        for s, e in zip(*self._file_data_runs(), strict=True):
            first, last = -(-(s * self.page_size) // size), (e * self.page_size) // size
            if last > first:
                parts.append(np.arange(first, last, dtype=np.int64) * size)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    @property
    def address(self) -> int:
        """Virtual address of the first byte in this process."""
        return int(self.array.ctypes.data)

    @property
    def shared_file(self) -> bool:
        """A shared mapping of a named file: another process mapping the file sees the same memory
        (what x-ignore-shared leaves out of a migration)."""
        return (self.backing is Backing.FILE and self.path is not None) or (
            self.backing is Backing.MEMFD and self.kept_by_host)

    def file_identity(self) -> dict[str, Any]:
        """The file a shared-file block maps: path (or the memfd), device and inode (a destination checks it
        maps the same)."""
        st = os.fstat(self.fd)
        where = str(self.path) if self.path is not None else f"memfd (descriptor {self.fd})"
        return {"path": where, "dev": st.st_dev, "ino": st.st_ino}

    def require(self, *kinds: Backing, feature: str) -> None:
        """Raise BackingError unless this block's backing is one of ``kinds``."""
        if self.backing not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            raise BackingError(f"{feature} needs RAM block '{self.name}' to be {wanted}-backed, "
                               f"but it is {self.backing.value}-backed")

    def populated_pages(self) -> np.ndarray:
        """Indices of pages ever populated (never-touched pages are known zero and cost nothing to send).

        A memfd or file asks the file itself (SEEK_DATA/SEEK_HOLE: exact, swapped-out pages included).
        Other memory asks the page tables (PAGEMAP_SCAN); there, userfaultfd write-protect markers look
        like swap entries, so while swap is active they make the answer a (safe) superset.
        """
        return pagemap.runs_to_pages(*self.populated_runs())

    def populated_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """The populated pages as half-open runs [start, end) (see ``populated_pages``)."""
        if self.fd >= 0:
            return self._file_data_runs()
        wanted = pagemap.PAGE_IS_PRESENT | (pagemap.PAGE_IS_SWAPPED if swap_active() else 0)
        return pagemap.scanner().scan_runs(
            self.address, self.size, self.page_size,
            category_inverted=pagemap.PAGE_IS_PFNZERO,
            category_mask=pagemap.PAGE_IS_PFNZERO,
            anyof_mask=wanted,
            return_mask=wanted,
        )

    def _file_data_runs(self) -> tuple[np.ndarray, np.ndarray]:
        starts, ends = [], []
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= self.size:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), self.size)
            starts.append(data // self.page_size)
            ends.append(-(-hole // self.page_size))
            pos = hole
        return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)

    def map_resident(self) -> int:
        """Map into this process every page of a memfd or file block that memory already holds; returns
        how many pages that was.

        Reading a page not mapped yet costs a fault; with userfaultfd write-protect markers in place it
        costs one per page (no fault-around), ~1.5 µs, so a tracker maps what it can before it protects.
        Only resident pages (mincore) are mapped: this starts no I/O and allocates nothing. The mapping is
        made page by page (MADV_NOHUGEPAGE first): populating may map a large folio whole, and a tracker
        would then see a write to one of its pages as a write to all of them (measured: 512).
        """
        if self._mmap is None or self.backing not in (Backing.MEMFD, Backing.FILE):
            return 0
        host_page = mmap.PAGESIZE
        resident = np.zeros(-(-self.size // host_page), dtype=np.uint8)
        if _LIBC.mincore(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size),
                         resident.ctypes.data_as(ctypes.c_void_p)) != 0:
            return 0  # an answer we cannot have costs only speed
        starts, ends = pagemap.pages_to_runs(np.flatnonzero(resident & 1))
        if len(starts):
            # page by page: a huge mapping of a large folio would be protected, and reported written, whole
            self._mmap.madvise(mmap.MADV_NOHUGEPAGE)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            try:
                self._mmap.madvise(_MADV_POPULATE_READ, s * host_page, (e - s) * host_page)
            except OSError as err:  # EINVAL before Linux 5.14; mapping stays lazy
                log.debug("map_resident_failed", block=self.name, error=str(err))
                return 0
        return int((ends - starts).sum())

    def discard(self) -> None:
        """Drop every page: the block reads as zero and holds no memory (a fresh destination)."""
        if self.backing is Backing.HOST:
            self.array[:] = 0
            return
        self.discard_runs(np.array([0]), np.array([self.npages]))

    def discard_runs(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Drop the pages of runs ``[start, end)``: they read as zero (or fault, if registered) and free memory."""
        if self.backing is Backing.HOST or self._mmap is None:
            raise BackingError(f"RAM block '{self.name}' is a buffer of the host's own: mig cannot drop its pages")
        advice = mmap.MADV_REMOVE if self.backing in (Backing.MEMFD, Backing.FILE) else mmap.MADV_DONTNEED
        ps = self.page_size
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            self._mmap.madvise(advice, s * ps, (e - s) * ps)

    def zero_pages(self, pages: np.ndarray) -> None:
        """Make ``pages`` (sorted) read as zero: dropped, freeing their memory, where mig owns the mapping
        (writing zeros would populate it); written where the host lent its own buffer."""
        if self.backing is Backing.HOST or self._mmap is None:
            self.pages[pages] = 0
        else:
            self.discard_runs(*pagemap.pages_to_runs(pages))

    def move_pages_away(self) -> int:
        """Move this anonymous block's pages to a new address and leave fresh, empty memory in their place.

        Returns where the old pages are now (``release_moved`` frees them). Both steps only move page
        tables, so the block is empty at once, whatever it held; freeing the old pages (the slow part)
        can then happen off any critical path. The block's address, views and mapping stay valid.
        """
        if self.backing is not Backing.ANONYMOUS or self._mmap is None:
            raise BackingError(f"RAM block '{self.name}' is {self.backing.value}-backed: only anonymous memory "
                               "can be swapped for a fresh mapping")
        lib = _LIBC
        spare = lib.mmap(None, ctypes.c_size_t(self.size), 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                         -1, ctypes.c_long(0))
        if spare in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"cannot reserve {self.size} bytes to move RAM block '{self.name}'")
        moved = lib.mremap(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size), ctypes.c_size_t(self.size),
                           _MREMAP_MAYMOVE | _MREMAP_FIXED, ctypes.c_void_p(spare))
        if moved in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            lib.munmap(ctypes.c_void_p(spare), ctypes.c_size_t(self.size))
            raise OSError(err, f"mremap of RAM block '{self.name}' failed: {os.strerror(err)}")
        fresh = lib.mmap(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size),
                         mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1,
                         ctypes.c_long(0))
        if fresh != self.address:
            raise OSError(ctypes.get_errno(), f"cannot map fresh memory for RAM block '{self.name}'")
        return int(moved)

    def release_moved(self, address: int) -> None:
        """Free pages ``move_pages_away`` moved (dropping them first, so the unmap holds no lock for long)."""
        _LIBC.madvise(ctypes.c_void_p(address), ctypes.c_size_t(self.size), mmap.MADV_DONTNEED)
        _LIBC.munmap(ctypes.c_void_p(address), ctypes.c_size_t(self.size))

    def lock(self) -> None:
        """Pin the whole block in memory (mlock): every page becomes resident and cannot be swapped out.

        OSError names the block and the limit when the kernel refuses (RLIMIT_MEMLOCK without CAP_IPC_LOCK).
        """
        if _LIBC.mlock(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot lock the {self.size} bytes of RAM block '{self.name}': {os.strerror(err)} "
                               "(see RLIMIT_MEMLOCK, ulimit -l)")

    def unlock(self) -> None:
        _LIBC.munlock(ctypes.c_void_p(self.address), ctypes.c_size_t(self.size))

    def close(self) -> None:
        """Release the mappings; views handed out before must no longer be used."""
        self.release_read_view()
        self.view.release()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                log.warning("ram_block_still_exported", block=self.name)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_LIBC.mremap.restype = ctypes.c_void_p
_LIBC.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2


def swap_active() -> bool:
    """True if any swap device is in use on this host."""
    try:
        with open("/proc/swaps") as f:
            return len(f.readlines()) > 1
    except OSError:
        return True


def _check_geometry(name: str, size: int, page_size: int) -> None:
    if not name or len(name.encode()) > 255:
        raise ValueError(f"RAM block name must be 1 to 255 bytes, not {name!r}")
    if page_size <= 0 or page_size & (page_size - 1) or page_size % mmap.PAGESIZE:
        raise ValueError(f"RAM block '{name}': page size {page_size} must be a power of two multiple of "
                         f"the host page size {mmap.PAGESIZE}")
    if size <= 0 or size % page_size:
        raise ValueError(f"RAM block '{name}': size {size} must be a positive multiple of its page size {page_size}")


def allocate(name: str, size: int, *, page_size: int = DEFAULT_PAGE_SIZE, backing: Backing = Backing.ANONYMOUS,
             path: str | os.PathLike[str] | None = None, prealloc: bool = False,
             transparent_hugepages: bool = True, fd: int | None = None) -> RAMBlock:
    """Allocate a block; ``prealloc`` faults every page in now (like ``-mem-prealloc``).

    ``fd`` (memfd backing): a memfd the host made and keeps, mapped instead of a new one; its contents
    are the block's (x-ignore-shared leaves such a block out of a migration to a process given the same).

    ``transparent_hugepages`` (anonymous memory) advises the kernel to back the block with huge pages
    where its THP setting allows, as QEMU does for guest RAM. Dirty tracking stays per page (the kernel
    splits a huge page when a tracked page of it is written), but a write to a never-touched huge page
    populates all of it, so ``populated_pages`` may list zero pages nearby (they cost a zero test).
    """
    _check_geometry(name, size, page_size)
    kept = fd is not None
    if kept and backing is not Backing.MEMFD:
        raise ValueError(f"RAM block '{name}': a descriptor goes only with memfd backing")
    file_path = None
    if backing is Backing.MEMFD:
        if fd is None:
            fd = os.memfd_create(f"mig:{name}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        else:
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise ValueError(f"RAM block '{name}': descriptor {fd}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"RAM block '{name}': descriptor {fd} is not a memfd or file")
            if st.st_size < size:
                os.ftruncate(fd, size)
            os.set_inheritable(fd, False)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    elif backing is Backing.ANONYMOUS:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    elif backing is Backing.FILE:
        fd = -1
        if path is None:
            raise ValueError(f"RAM block '{name}': a file backing needs a path")
        file_path = Path(path)
        fd = os.open(file_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    else:
        raise ValueError("use from_buffer() for host buffers")
    thp = False
    if transparent_hugepages and backing is Backing.ANONYMOUS:
        try:
            mm.madvise(_MADV_HUGEPAGE)
            thp = True
        except OSError:  # a kernel without THP
            pass
    if prealloc:
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            np.frombuffer(mm, dtype=np.uint8)[::page_size] = 0  # older kernels: touch each page
    block = RAMBlock(name, size, page_size, backing, memoryview(mm), -1 if fd is None else fd, file_path, kept, mm)
    log.info("ram_block_allocated", block=name, size=size, page_size=page_size, backing=backing.value,
             prealloc=prealloc, transparent_hugepages=thp)
    return block


def from_buffer(name: str, buffer: Any, *, page_size: int = DEFAULT_PAGE_SIZE) -> RAMBlock:
    """Wrap a host's own writable, contiguous buffer (bytearray, numpy array, mmap ...) as a block."""
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError(f"RAM block '{name}': the host buffer is read-only")
    if not view.c_contiguous:
        raise ValueError(f"RAM block '{name}': the host buffer must be contiguous")
    view = view.cast("B")
    _check_geometry(name, view.nbytes, page_size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    if addr % mmap.PAGESIZE:
        raise ValueError(f"RAM block '{name}': the host buffer must start on a page boundary "
                         f"(address {addr:#x})")
    return RAMBlock(name, view.nbytes, page_size, Backing.HOST, view, _owner=buffer)
