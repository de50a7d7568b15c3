"""The snapshot-backend extension point (``mig_core.snapshot_backends``): where named snapshots live.

A backend is one storage node (``snapshot-save``'s ``devices`` and ``vmstate``
name nodes). A save hands it, through a ``SnapshotWriter``, the machine's RAM
page by page (only pages that are not zero; from several threads at once) and
the device state as one opaque stream; ``commit`` then publishes the tag in
one atomic step, so a crash or a failed save leaves every earlier tag as it
was. A load asks a ``SnapshotReader`` to put each block's pages straight into
RAM (from several threads). How pages are stored is the backend's business: one image per tag, or
pages shared between tags by content (a deduplicating backend).

Save and load run on the snapshot job's thread (and its helper threads for
pages) with the machine stopped; ``list`` may run on the QMP thread at any
time and must not wait for a save in progress.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import numpy as np
import structlog

from mig_core.plugin.registry import PluginRegistry

log = structlog.get_logger("mig.snapshot_backend")

#: The entry-point group of snapshot backends (key: the backend's name, e.g. ``dir`` or ``dedup``).
GROUP = "mig_core.snapshot_backends"


@dataclass(frozen=True)
class SnapshotInfo:
    """One committed snapshot as ``x-query-snapshots`` and ``mig snapshot list`` show it."""

    tag: str
    #: bytes on storage that belong to this snapshot alone (pages shared with other tags count in none)
    size: int
    #: seconds since the epoch when it was committed
    date: float
    #: bytes of VM state the snapshot holds (RAM pages that are not zero, plus device state): QEMU's
    #: vm-state-size; 0 for a disk-only snapshot (no VM state on this node)
    vm_state_size: int
    #: bytes of RAM the snapshot restores (the machine's RAM size when it was saved)
    ram_size: int = 0


@dataclass(frozen=True)
class BlockShape:
    """A RAM block as a snapshot records it."""

    name: str
    size: int
    page_size: int

    @property
    def npages(self) -> int:
        return self.size // self.page_size


class SnapshotWriter(ABC):
    """One save in progress. Nothing it received is visible under the tag until ``commit``."""

    @abstractmethod
    def put_pages(self, block: BlockShape, pages: np.ndarray, data: np.ndarray) -> None:
        """Store ``pages`` (sorted page indices) of ``block``; ``data`` holds one row of page_size bytes per
        page. Pages never given are zero. Called from several threads at once, each with its own pages."""

    @abstractmethod
    def put_vmstate(self, data: bytes) -> None:
        """The device-state stream (opaque to the backend), given once, after every page."""

    @abstractmethod
    def commit(self) -> SnapshotInfo:
        """Make the snapshot durable and visible under its tag (atomically: all or nothing)."""

    @abstractmethod
    def abandon(self) -> None:
        """Throw the partial save away (a failed or cancelled save); earlier tags are untouched."""


class SnapshotReader(ABC):
    """One committed snapshot, opened for loading."""

    @abstractmethod
    def blocks(self) -> list[BlockShape]:
        """The RAM blocks the snapshot holds, in the order they were saved."""

    @abstractmethod
    def stored_pages(self, block: BlockShape) -> np.ndarray:
        """The indices (sorted) of the block's pages the snapshot holds; every other page was zero."""

    @abstractmethod
    def read_pages(self, block: BlockShape, pages: np.ndarray, into: memoryview) -> None:
        """Write stored ``pages`` (sorted, a part of ``stored_pages``) into ``into``, the block's whole RAM
        (page i at byte i × page_size). Called from several threads at once, each with its own pages."""

    @abstractmethod
    def vmstate(self) -> bytes:
        """The device-state stream given to ``put_vmstate``."""

    def close(self) -> None:
        """Release what the reader holds (descriptors, maps)."""


class SnapshotBackend(ABC):
    """One storage node that holds named snapshots. Plugins subclass this."""

    #: The name in the ``mig_core.snapshot_backends`` group.
    name: ClassVar[str]

    #: The options the backend takes, each required, with what it is; any other option is refused.
    options_taken: ClassVar[dict[str, str]] = {}

    def __init__(self, node_name: str, options: Mapping[str, str]) -> None:
        """``options`` are the backend's own settings (e.g. ``dir``), checked here against ``options_taken``:
        a bad one raises ``ValueError`` with a text naming the option."""
        unknown = sorted(set(options) - set(self.options_taken))
        if unknown:
            raise ValueError(f"snapshot backend '{self.name}' has no option '{unknown[0]}' (it takes: "
                             f"{', '.join(self.options_taken)})")
        for key, what in self.options_taken.items():
            if not options.get(key):
                raise ValueError(f"snapshot backend '{self.name}' needs the option '{key}' ({what})")
        self.node_name = node_name
        self.options = dict(options)

    @abstractmethod
    def list(self) -> list[SnapshotInfo]:
        """Every committed snapshot, oldest first."""

    def exists(self, tag: str) -> bool:
        return any(s.tag == tag for s in self.list())

    @abstractmethod
    def begin(self, tag: str, blocks: builtins.list[BlockShape]) -> SnapshotWriter:
        """Start saving ``tag`` (the caller checked it does not exist yet)."""

    @abstractmethod
    def open(self, tag: str) -> SnapshotReader:
        """The committed snapshot ``tag``; ``KeyError`` if there is none."""

    @abstractmethod
    def delete(self, tag: str) -> None:
        """Remove the committed snapshot ``tag`` and free what no other tag uses; ``KeyError`` if there is
        none."""

    def close(self) -> None:
        """Release the node (host shutdown)."""


class TagDirectory:
    """Committed tags as directories under ``ROOT/tags``, each published by one rename: a helper for
    backends that keep files per tag.

    A save writes into a staging directory (``.new-*``) and ``publish`` renames it to the tag's name
    after everything in it is on disk, so a crash leaves either the complete tag or none (the staging
    directory is removed at the next open). A delete renames the tag away (``.del-*``) before removing
    its files. ``ROOT/lock`` is held (flock) while the directory is open: a second process is refused.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tags = root / "tags"
        try:
            self.tags.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ValueError(f"snapshot directory '{root}': {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ValueError(f"snapshot directory '{root}' is in use by another process") from None
        for leftover in self.tags.glob(".*-*"):  # a save or a delete that a crash cut short
            log.warning("snapshot_leftover_removed", path=str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)

    def _dir(self, tag: str) -> Path:
        return self.tags / ("t-" + quote(tag, safe=""))

    def staging(self) -> Path:
        """A new, empty directory to write a tag's files into."""
        path = self.tags / f".new-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def publish(self, staging: Path, tag: str, manifest: dict[str, Any]) -> None:
        """Write the manifest, flush the directory and rename it to ``tag`` (the files in it are synced
        by the caller)."""
        with open(staging / "manifest.json", "w") as f:
            json.dump({"tag": tag, **manifest}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(staging)
        os.rename(staging, self._dir(tag))  # fails if the tag exists: never replaces one
        _fsync_dir(self.tags)

    def manifests(self) -> list[dict[str, Any]]:
        """Every committed tag's manifest, oldest first."""
        out = []
        for d in self.tags.glob("t-*"):
            try:
                out.append(json.loads((d / "manifest.json").read_text()))
            except (OSError, ValueError) as e:
                log.warning("snapshot_manifest_unreadable", path=str(d), error=str(e))
        return sorted(out, key=lambda m: m.get("date", 0))

    def path(self, tag: str) -> Path:
        """The committed tag's directory; KeyError if there is none."""
        d = self._dir(tag)
        if not (d / "manifest.json").exists():
            raise KeyError(tag)
        return d

    def manifest(self, tag: str) -> dict[str, Any]:
        return dict(json.loads((self.path(tag) / "manifest.json").read_text()))

    def remove(self, tag: str) -> None:
        """Unpublish ``tag`` at once (one rename), then remove its files."""
        gone = self.tags / f".del-{uuid.uuid4().hex}"
        os.rename(self.path(tag), gone)
        _fsync_dir(self.tags)
        shutil.rmtree(gone, ignore_errors=True)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (a positioned write may write less than asked)."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def read_at(fd: int, into: memoryview, offset: int) -> None:
    """Fill ``into`` from ``offset``; OSError if the file ends first (a store cut short)."""
    while into.nbytes:
        n = os.preadv(fd, [into], offset)
        if n == 0:
            raise OSError(f"the file ends at byte {offset}: it was cut short")
        into, offset = into[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(registry: PluginRegistry, name: str) -> type[SnapshotBackend]:
    """The backend class serving ``name``; logs its class and distribution. ``PluginNotFound`` naming the
    group and the name if none does."""
    return registry.load_class(GROUP, name, SnapshotBackend)
