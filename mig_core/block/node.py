"""A block node: a named file that host software writes through mig, with its dirty bitmaps.

Writes go through ``BlockNode.write`` so every enabled bitmap sees them. Persistent bitmaps are kept in
a sidecar file (``<file>.bitmaps``, msgpack) written when the node closes; while the node is open the
sidecar says so, and bitmaps loaded from a sidecar that was never closed are marked inconsistent (the
writes of the crashed run are unknown), as QEMU marks a qcow2 bitmap left "in use".

An active node holds a write lock on its file (an open-file-description lock, as QEMU's image locking),
so a second process opening it for writing sees it; an incoming migration opens its nodes inactive and
activates them when the machine takes over (with ``late-block-activate``, at ``cont``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from pathlib import Path

import msgpack
import structlog

from mig_core.block.bitmap import DirtyBitmap

log = structlog.get_logger("mig.block")

_SIDECAR_VERSION = 1
#: struct flock: type, whence, start, len, pid (0 for an OFD lock)
_FLOCK = struct.Struct("hhqqi4x")


class NodeLockError(OSError):
    """Another process holds the node's file (QEMU: ``Failed to get "write" lock``)."""


class BlockNode:
    """One node: ``name``, backed by the file at ``path`` of ``size`` bytes (created or grown to it)."""

    def __init__(self, name: str, path: str | Path, size: int | None = None) -> None:
        self.name = name
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        current = os.fstat(self._fd).st_size
        if size is not None and size != current:
            if size < current:
                os.close(self._fd)
                raise ValueError(f"block node '{name}': {self.path} holds {current} bytes, more than size={size}")
            os.ftruncate(self._fd, size)
        self.size = size if size is not None else current
        #: holds the write lock and may be written by the program (an incoming node is inactive until then)
        self.active = False
        self.bitmaps: dict[str, DirtyBitmap] = {}
        #: anonymous bitmaps (a migration's own tracking): they see writes but are not listed
        self._trackers: list[DirtyBitmap] = []
        self._lock = threading.Lock()
        self._load_bitmaps()
        self._store_bitmaps(in_use=True)

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".bitmaps")

    # -- data ----------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; every enabled bitmap records it."""
        n = self._check_range(offset, data)
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"block node '{self.name}' is closed")
            os.pwrite(self._fd, data, offset)
            for bm in self.bitmaps.values():
                bm.mark(offset, n)
            for bm in self._trackers:
                bm.mark(offset, n)

    def write_untracked(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write without marking any bitmap: what an incoming migration places (its bitmaps come apart)."""
        self._check_range(offset, data)
        with self._lock:
            os.pwrite(self._fd, data, offset)

    def _check_range(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """The write's length; ValueError if it does not fit the node."""
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"block node '{self.name}': write of {n} bytes at {offset} beyond its {self.size} bytes")
        return n

    def add_tracker(self, bitmap: DirtyBitmap) -> None:
        with self._lock:
            self._trackers.append(bitmap)

    def remove_tracker(self, bitmap: DirtyBitmap) -> None:
        with self._lock:
            if bitmap in self._trackers:
                self._trackers.remove(bitmap)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def flush(self) -> None:
        os.fsync(self._fd)

    def _lock_file(self, kind: int) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))

    def activate(self) -> None:
        """Take the write lock (NodeLockError if another process has the file); idempotent."""
        if self.active:
            return
        try:
            self._lock_file(fcntl.F_WRLCK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise NodeLockError(f'Failed to get "write" lock: Is another process using the image '
                                    f"[{self.path}]?") from None
            raise
        self.active = True
        log.info("block_node_activated", node=self.name)

    def inactivate(self) -> None:
        """Flush and let the lock go (the source at switchover: the destination takes over the file)."""
        if not self.active or self._fd < 0:
            return
        self.flush()
        self._lock_file(fcntl.F_UNLCK)
        self.active = False
        log.info("block_node_inactivated", node=self.name)

    # -- bitmaps -------------------------------------------------------------------------

    def add_bitmap(self, bitmap: DirtyBitmap) -> None:
        with self._lock:
            self.bitmaps[bitmap.name] = bitmap

    def remove_bitmap(self, name: str) -> DirtyBitmap:
        with self._lock:
            bm = self.bitmaps.pop(name)
        if bm.persistent:
            self._store_bitmaps(in_use=True)  # a removed persistent bitmap does not come back
        return bm

    def _load_bitmaps(self) -> None:
        try:
            raw = self.sidecar.read_bytes()
        except FileNotFoundError:
            return
        loaded: dict[str, DirtyBitmap] = {}
        try:
            doc = msgpack.unpackb(raw, raw=False)
            crashed = bool(doc["in-use"])
            for name, b in doc["bitmaps"].items():
                bm = DirtyBitmap(name, self.size, b["granularity"], enabled=b["enabled"], persistent=True)
                bm.load_packed(b["bits"])
                bm.inconsistent = crashed or bool(b.get("inconsistent", False))
                loaded[name] = bm
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            # none of it is trusted, and the file is kept aside: storing the bitmaps would replace it
            kept = self.sidecar.with_name(self.sidecar.name + ".unreadable")
            os.replace(self.sidecar, kept)
            log.warning("block_bitmaps_unreadable", node=self.name, sidecar=str(self.sidecar), kept_as=str(kept),
                        error=str(e) or repr(e))
            return
        self.bitmaps.update(loaded)
        log.info("block_bitmaps_loaded", node=self.name, bitmaps=sorted(self.bitmaps),
                 inconsistent=[n for n, b in self.bitmaps.items() if b.inconsistent])

    def _store_bitmaps(self, in_use: bool) -> None:
        persistent = {n: b for n, b in self.bitmaps.items() if b.persistent}
        if not persistent and not self.sidecar.exists():
            return
        doc = {"version": _SIDECAR_VERSION, "in-use": in_use,
               "bitmaps": {n: {"granularity": b.granularity, "enabled": b.enabled, "inconsistent": b.inconsistent,
                               "bits": b.packed()} for n, b in persistent.items()}}
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_bytes(msgpack.packb(doc, use_bin_type=True))
        os.replace(tmp, self.sidecar)

    def close(self) -> None:
        """Store the persistent bitmaps (marked cleanly closed) and close the file."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._store_bitmaps(in_use=False)
            except OSError as e:
                log.warning("block_bitmaps_not_stored", node=self.name, error=e.strerror)
            os.close(self._fd)
            self._fd = -1
