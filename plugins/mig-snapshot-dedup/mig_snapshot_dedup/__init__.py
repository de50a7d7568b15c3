"""The ``dedup`` snapshot backend: every page is stored once, by content (xxh3-128), in a page store shared
by all tags; a tag is a list of page slots. N snapshots of a machine that changes 1 % between them cost
about one image plus N %; deleting a tag frees (punches out) only the pages no other tag holds.

Crash safety: a save writes new pages into free or new slots and the slot hashes, syncs both, then
publishes the tag's manifest with one rename. Reference counts are not stored: they are counted from
the committed tags when the store opens, so a slot a crashed save wrote is simply free again.
"""

from __future__ import annotations

import builtins
import ctypes
import ctypes.util
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import structlog
import xxhash
import zstandard

from mig_core.ext.snapshot_backend import (
    BlockShape,
    SnapshotBackend,
    SnapshotInfo,
    SnapshotReader,
    SnapshotWriter,
    TagDirectory,
    read_at,
    write_at,
)
from mig_core.memory.pagemap import pages_to_runs

__all__ = ["DedupBackend"]

log = structlog.get_logger("mig.snapshot.dedup")

DIGEST = 16  # xxh3-128: a collision between two different pages is out of reach (2^-64 per pair at worst)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the storage of a byte range (it reads as zeros after)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        log.warning("punch_hole_failed", error=os.strerror(err))


def _encode_slots(slots: np.ndarray) -> bytes:
    """Slot numbers (−1: a zero page), delta-coded (runs of new pages become runs of 1s) and compressed, with
    zstd's checksum of the content: a damaged list is refused when read, not loaded as other pages."""
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(
        np.diff(slots, prepend=0).astype("<i8").tobytes())


def _decode_slots(data: bytes, npages: int, store: _Store, where: Path) -> np.ndarray:
    """The slot numbers of ``where`` (a tag's slot list into ``store``); OSError naming the file if it is
    damaged or names a slot no save wrote (its page would read as another's, or as zeros)."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=npages * 8)
    except zstandard.ZstdError as e:
        raise OSError(f"{where}: the slot list is damaged ({e})") from None
    deltas = np.frombuffer(raw, dtype="<i8")
    if len(deltas) != npages:
        raise OSError(f"{where}: the slot list holds {len(deltas)} pages, the block has {npages}")
    slots = np.cumsum(deltas)
    if len(slots) and int(slots.min()) < -1:
        raise OSError(f"{where}: the slot list names slot {int(slots.min())} (-1 is a zero page, the rest count "
                      "from 0)")
    if len(slots) and int(slots.max()) >= store.nslots:
        raise OSError(f"{where}: the slot list names slot {int(slots.max())}, but pages-{store.ps}.pack holds "
                      f"{store.nslots}")
    return slots


class _Store:
    """The pages of one page size: ``pages-<ps>.pack`` (slot i at i × ps) and ``pages-<ps>.hashes``."""

    def __init__(self, root: Path, page_size: int) -> None:
        self.ps = page_size
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self.fd = os.open(root / f"pages-{page_size}.pack", flags, 0o600)
        self.hfd = os.open(root / f"pages-{page_size}.hashes", flags, 0o600)
        raw = os.pread(self.hfd, os.fstat(self.hfd).st_size, 0)
        self.nslots = len(raw) // DIGEST
        self.hashes = bytearray(raw[:self.nslots * DIGEST])
        self.refs = np.zeros(self.nslots, dtype=np.int64)
        self.index: dict[bytes, int] = {}
        self.free: list[int] = []
        self.lock = threading.Lock()

    def _grow(self, n: int) -> None:
        if n > len(self.refs):
            self.refs = np.concatenate([self.refs, np.zeros(max(n, 2 * len(self.refs)) - len(self.refs), np.int64)])

    def rebuild(self) -> None:
        """After the committed tags' references were counted: index the live slots, free (and punch out)
        the rest."""
        self._grow(self.nslots)
        live = np.flatnonzero(self.refs[:self.nslots] > 0)
        h = self.hashes
        self.index = {bytes(h[s * DIGEST:(s + 1) * DIGEST]): int(s) for s in live.tolist()}
        dead = np.flatnonzero(self.refs[:self.nslots] == 0)
        self.free = sorted(dead.tolist(), reverse=True)  # lowest slot handed out first
        for s, e in zip(*(r.tolist() for r in pages_to_runs(dead)), strict=True):
            _punch(self.fd, s * self.ps, (e - s) * self.ps)

    def allocate(self, digests: list[bytes], fresh: list[int]) -> np.ndarray:
        """The slot of each digest: an existing one with the same content, else a free or new one (its
        number appended to ``fresh``)."""
        out = np.empty(len(digests), dtype=np.int64)
        with self.lock:
            index = self.index
            for i, d in enumerate(digests):
                slot = index.get(d)
                if slot is None:
                    slot = self.free.pop() if self.free else self.nslots
                    if slot == self.nslots:
                        self.nslots += 1
                        self.hashes += bytes(DIGEST)
                    self.hashes[slot * DIGEST:(slot + 1) * DIGEST] = d
                    index[d] = slot
                    fresh.append(slot)
                out[i] = slot
        return out

    def release(self, slots: list[int]) -> None:
        """Slots whose last reference went (a delete) or that a save allocated and abandoned."""
        if not slots:
            return
        with self.lock:
            for s in slots:
                self.index.pop(bytes(self.hashes[s * DIGEST:(s + 1) * DIGEST]), None)
            self.free.extend(slots)
            self.free.sort(reverse=True)
        arr = np.unique(np.asarray(slots, dtype=np.int64))
        for s, e in zip(*(r.tolist() for r in pages_to_runs(arr)), strict=True):
            _punch(self.fd, s * self.ps, (e - s) * self.ps)

    def sync(self) -> None:
        """Page data and slot hashes durable (before a manifest may refer to them)."""
        with self.lock:
            hashes = bytes(self.hashes)
        write_at(self.hfd, memoryview(hashes), 0)
        os.fsync(self.fd)
        os.fsync(self.hfd)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.hfd)


class _Writer(SnapshotWriter):
    def __init__(self, backend: DedupBackend, tag: str, blocks: list[BlockShape]) -> None:
        self.backend, self.tag, self.blocks = backend, tag, blocks
        self.slots = {b.name: np.full(b.npages, -1, dtype=np.int64) for b in blocks}
        self.fresh: dict[int, list[int]] = {b.page_size: [] for b in blocks}
        self.vmstate = b""
        self.staging = backend.tags.staging()
        self._lock = threading.Lock()

    def put_pages(self, block: BlockShape, pages: np.ndarray, data: np.ndarray) -> None:
        store = self.backend.store(block.page_size)
        rows = np.ascontiguousarray(data)
        flat = rows.data.cast("B")
        ps = block.page_size
        digest = xxhash.xxh3_128_digest
        digests = [digest(flat[i * ps:(i + 1) * ps]) for i in range(len(pages))]
        fresh: list[int] = []
        slots = store.allocate(digests, fresh)
        if fresh:
            new = np.isin(slots, np.asarray(fresh, dtype=np.int64))
            rows_new = np.flatnonzero(new)
            first_use = np.unique(slots[rows_new], return_index=True)[1]  # a page repeated in this call
            rows_new = rows_new[first_use]
            rows_new.sort()
            # runs where both the rows and their slots are consecutive go out in one write
            breaks = np.flatnonzero((np.diff(rows_new) != 1) | (np.diff(slots[rows_new]) != 1)) + 1
            for run in np.split(rows_new, breaks):
                r0, n = int(run[0]), len(run)
                write_at(store.fd, flat[r0 * ps:(r0 + n) * ps], int(slots[r0]) * ps)
        with self._lock:
            self.fresh[ps] += fresh
            self.slots[block.name][pages] = slots

    def put_vmstate(self, data: bytes) -> None:
        self.vmstate = data

    def commit(self) -> SnapshotInfo:
        b = self.backend
        for ps in self.fresh:
            b.store(ps).sync()
        for name, content in [("vmstate.bin", self.vmstate)] + [
                (f"slots-{i}.zst", _encode_slots(self.slots[blk.name])) for i, blk in enumerate(self.blocks)]:
            with open(self.staging / name, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        stored = sum(int((self.slots[blk.name] >= 0).sum()) * blk.page_size for blk in self.blocks)
        manifest = {"date": time.time(), "vm_state_size": stored + len(self.vmstate) if self.blocks else 0,
                    "ram_size": sum(blk.size for blk in self.blocks),
                    "blocks": [[blk.name, blk.size, blk.page_size] for blk in self.blocks]}
        b.tags.publish(self.staging, self.tag, manifest)
        b.adopt(self.tag, manifest | {"tag": self.tag}, self.slots)
        log.info("dedup_saved", tag=self.tag, new_pages=sum(len(v) for v in self.fresh.values()),
                 pages=sum(int((s >= 0).sum()) for s in self.slots.values()))
        return b.info(self.tag)

    def abandon(self) -> None:
        for ps, fresh in self.fresh.items():
            self.backend.store(ps).release(fresh)
        shutil.rmtree(self.staging, ignore_errors=True)


class _Reader(SnapshotReader):
    def __init__(self, backend: DedupBackend, tag: str) -> None:
        self.backend = backend
        manifest = backend.manifests[tag]
        self.shapes = [BlockShape(n, s, ps) for n, s, ps in manifest["blocks"]]
        self.slots = backend.slots[tag]
        self._vmstate = (backend.tags.path(tag) / "vmstate.bin").read_bytes()

    def blocks(self) -> list[BlockShape]:
        return list(self.shapes)

    def stored_pages(self, block: BlockShape) -> np.ndarray:
        return np.flatnonzero(self.slots[block.name] >= 0)

    def read_pages(self, block: BlockShape, pages: np.ndarray, into: memoryview) -> None:
        ps, fd = block.page_size, self.backend.store(block.page_size).fd
        slots = self.slots[block.name][pages]
        breaks = np.flatnonzero((np.diff(pages) != 1) | (np.diff(slots) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(pages)])).tolist()
        for a, z in zip(starts, ends, strict=True):
            p0 = int(pages[a])
            read_at(fd, into[p0 * ps:(p0 + z - a) * ps], int(slots[a]) * ps)

    def vmstate(self) -> bytes:
        return self._vmstate


class DedupBackend(SnapshotBackend):
    """``dedup``: options ``dir`` (the directory; created if missing)."""

    name = "dedup"
    options_taken = {"dir": "the directory to keep snapshots in"}

    def __init__(self, node_name: str, options: Mapping[str, str]) -> None:
        super().__init__(node_name, options)
        self.root = Path(options["dir"])
        self.tags = TagDirectory(self.root)
        self._stores: dict[int, _Store] = {}
        self._lock = threading.Lock()
        self.manifests: dict[str, dict] = {}
        self.slots: dict[str, dict[str, np.ndarray]] = {}
        # a failed open releases the directory's lock and the stores' descriptors
        try:
            self._open()
        except OSError as e:  # a damaged store: the node cannot be used, as with a bad option
            self.close()
            raise ValueError(f"snapshot directory '{self.root}': {e}") from None
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        """Open the page stores and read every committed tag's slot list (OSError naming a damaged one)."""
        for path in self.root.glob("pages-*.pack"):
            self.store(int(path.name.split("-")[1].split(".")[0]))
        for m in self.tags.manifests():
            tag = m["tag"]
            d = self.tags.path(tag)
            slots = {}
            for i, (name, size, ps) in enumerate(m["blocks"]):
                path = d / f"slots-{i}.zst"
                slots[name] = _decode_slots(path.read_bytes(), size // ps, self.store(ps), path)
            self._count(m, slots)
            self.manifests[tag], self.slots[tag] = m, slots
        for store in self._stores.values():
            store.rebuild()

    def store(self, page_size: int) -> _Store:
        with self._lock:
            s = self._stores.get(page_size)
            if s is None:
                s = self._stores[page_size] = _Store(self.root, page_size)
            return s

    def _count(self, manifest: dict, slots: dict[str, np.ndarray]) -> None:
        """A committed tag's references count (at open, and when a save commits)."""
        for name, _size, ps in manifest["blocks"]:
            store = self.store(ps)
            used = slots[name][slots[name] >= 0]
            store._grow(int(used.max()) + 1 if len(used) else 0)
            np.add.at(store.refs, used, 1)

    def adopt(self, tag: str, manifest: dict, slots: dict[str, np.ndarray]) -> None:
        """A committed save: its references count from now on."""
        self._count(manifest, slots)
        self.manifests[tag], self.slots[tag] = manifest, slots

    def info(self, tag: str) -> SnapshotInfo:
        m = self.manifests[tag]
        own = 0
        for name, _size, ps in m["blocks"]:
            used = self.slots[tag][name]
            used = used[used >= 0]
            own += int((self.store(ps).refs[used] == 1).sum()) * ps  # pages no other tag (or page) shares
        path = self.tags.path(tag)
        own += sum(f.stat().st_blocks * 512 for f in path.iterdir())
        return SnapshotInfo(tag=tag, size=own, date=m["date"], vm_state_size=m["vm_state_size"],
                            ram_size=m["ram_size"])

    def list(self) -> list[SnapshotInfo]:
        return [self.info(t) for t in sorted(self.manifests, key=lambda t: self.manifests[t]["date"])]

    def exists(self, tag: str) -> bool:
        return tag in self.manifests

    def begin(self, tag: str, blocks: builtins.list[BlockShape]) -> SnapshotWriter:  # list: the method above
        return _Writer(self, tag, blocks)

    def open(self, tag: str) -> SnapshotReader:
        if tag not in self.manifests:
            raise KeyError(tag)
        return _Reader(self, tag)

    def delete(self, tag: str) -> None:
        manifest = self.manifests[tag]
        self.tags.remove(tag)
        slots = self.slots.pop(tag)
        del self.manifests[tag]
        by_size: dict[int, list[int]] = {}
        for name, _size, ps in manifest["blocks"]:
            used = slots[name][slots[name] >= 0]
            store = self.store(ps)
            np.subtract.at(store.refs, used, 1)
            by_size.setdefault(ps, []).extend(np.unique(used[store.refs[used] == 0]).tolist())
        for ps, emptied in by_size.items():
            self.store(ps).release(emptied)
        log.info("dedup_deleted", tag=tag, freed_pages=sum(len(v) for v in by_size.values()))

    def close(self) -> None:
        for s in self._stores.values():
            s.close()
        self._stores.clear()
        self.tags.close()
