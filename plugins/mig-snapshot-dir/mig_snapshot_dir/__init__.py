"""The ``dir`` snapshot backend: each tag is a directory holding one sparse RAM image with every page at a
fixed offset (written and read by several threads with positioned I/O), a bitmap of the pages it holds,
and the device state."""

from __future__ import annotations

import builtins
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import structlog

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

__all__ = ["DirectoryBackend"]

log = structlog.get_logger("mig.snapshot.dir")

#: Each block's region starts on a 1 MiB boundary of the image (as mapped-ram's regions).
ALIGN = 1 << 20


def _layout(blocks: list[BlockShape]) -> dict[str, int]:
    offsets, pos = {}, 0
    for b in blocks:
        offsets[b.name] = pos
        pos += (b.size + ALIGN - 1) // ALIGN * ALIGN
    return offsets


class _Writer(SnapshotWriter):
    def __init__(self, backend: DirectoryBackend, tag: str, blocks: list[BlockShape]) -> None:
        self.backend, self.tag, self.blocks = backend, tag, blocks
        self.offsets = _layout(blocks)
        self.staging = backend.store.staging()
        self.fd = os.open(self.staging / "ram.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.stored = {b.name: np.zeros(b.npages, dtype=bool) for b in blocks}
        self.vmstate = b""
        self._lock = threading.Lock()

    def put_pages(self, block: BlockShape, pages: np.ndarray, data: np.ndarray) -> None:
        ps, base = block.page_size, self.offsets[block.name]
        flat = np.ascontiguousarray(data).data.cast("B")
        pos = 0
        for s, e in zip(*(r.tolist() for r in pages_to_runs(pages)), strict=True):
            n = (e - s) * ps
            write_at(self.fd, flat[pos:pos + n], base + s * ps)
            pos += n
        with self._lock:
            self.stored[block.name][pages] = True

    def put_vmstate(self, data: bytes) -> None:
        self.vmstate = data

    def commit(self) -> SnapshotInfo:
        end = max((self.offsets[b.name] + b.size for b in self.blocks), default=0)
        os.ftruncate(self.fd, end)  # the image covers all RAM (holes where pages were zero)
        os.fsync(self.fd)
        bitmaps = b"".join(np.packbits(self.stored[b.name]).tobytes() for b in self.blocks)
        for name, content in (("stored.bits", bitmaps), ("vmstate.bin", self.vmstate)):
            with open(self.staging / name, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        pages_bytes = sum(int(self.stored[b.name].sum()) * b.page_size for b in self.blocks)
        date = time.time()
        manifest = {"date": date, "vm_state_size": pages_bytes + len(self.vmstate) if self.blocks else 0,
                    "ram_size": sum(b.size for b in self.blocks),
                    "blocks": [[b.name, b.size, b.page_size, self.offsets[b.name]] for b in self.blocks]}
        os.close(self.fd)
        self.fd = -1
        self.backend.store.publish(self.staging, self.tag, manifest)
        return self.backend.info(manifest | {"tag": self.tag})

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.staging, ignore_errors=True)


class _Reader(SnapshotReader):
    def __init__(self, path: Path, manifest: dict) -> None:
        self.shapes = [BlockShape(n, s, ps) for n, s, ps, _ in manifest["blocks"]]
        self.offsets = {n: off for n, _, _, off in manifest["blocks"]}
        bits = np.frombuffer((path / "stored.bits").read_bytes(), dtype=np.uint8)
        self.stored: dict[str, np.ndarray] = {}
        pos = 0
        for b in self.shapes:
            nbytes = (b.npages + 7) // 8
            if pos + nbytes > len(bits):
                raise OSError(f"{path / 'stored.bits'}: cut short")
            self.stored[b.name] = np.flatnonzero(np.unpackbits(bits[pos:pos + nbytes], count=b.npages))
            pos += nbytes
        self._vmstate = (path / "vmstate.bin").read_bytes()
        # opened last: a tag whose other files are damaged leaves no descriptor behind
        self.fd = os.open(path / "ram.img", os.O_RDONLY | os.O_CLOEXEC)

    def blocks(self) -> list[BlockShape]:
        return list(self.shapes)

    def stored_pages(self, block: BlockShape) -> np.ndarray:
        return self.stored[block.name]

    def read_pages(self, block: BlockShape, pages: np.ndarray, into: memoryview) -> None:
        ps, base = block.page_size, self.offsets[block.name]
        for s, e in zip(*(r.tolist() for r in pages_to_runs(pages)), strict=True):
            read_at(self.fd, into[s * ps:e * ps], base + s * ps)

    def vmstate(self) -> bytes:
        return self._vmstate

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectoryBackend(SnapshotBackend):
    """``dir``: options ``dir`` (the directory; created if missing)."""

    name = "dir"
    options_taken = {"dir": "the directory to keep snapshots in"}

    def __init__(self, node_name: str, options: Mapping[str, str]) -> None:
        super().__init__(node_name, options)
        self.store = TagDirectory(Path(options["dir"]))

    def info(self, manifest: dict) -> SnapshotInfo:
        path = self.store.path(manifest["tag"])
        size = sum(f.stat().st_blocks * 512 for f in path.iterdir())
        return SnapshotInfo(tag=manifest["tag"], size=size, date=manifest["date"],
                            vm_state_size=manifest["vm_state_size"], ram_size=manifest["ram_size"])

    def list(self) -> list[SnapshotInfo]:
        out = []
        for m in self.store.manifests():
            try:
                out.append(self.info(m))
            except (KeyError, OSError):  # deleted meanwhile
                continue
        return out

    def exists(self, tag: str) -> bool:
        try:
            self.store.path(tag)
        except KeyError:
            return False
        return True

    def begin(self, tag: str, blocks: builtins.list[BlockShape]) -> SnapshotWriter:  # list: the method above
        return _Writer(self, tag, blocks)

    def open(self, tag: str) -> SnapshotReader:
        path = self.store.path(tag)
        return _Reader(path, self.store.manifest(tag))

    def delete(self, tag: str) -> None:
        self.store.remove(tag)

    def close(self) -> None:
        self.store.close()
