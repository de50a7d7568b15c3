"""The snapshot-backend extension point (``mig_core.snapshot_backends``): where named snapshots live.

A backend provides storage nodes (``snapshot-save``'s ``devices`` and ``vmstate``
name them). Saving a snapshot writes the machine's stream (RAM in mapped-ram
layout, then device state) into a seekable channel the backend opens for the
tag, then ``commit`` makes it visible; loading reads it back; ``delete``
removes it. A tag is visible only once committed, so a crash or a failed save
leaves the previous snapshots as they were. A deduplicating backend may store
pages shared by several tags once; the contract does not change.

Every call runs on the snapshot job's thread with the machine stopped (QEMU's
snapshot-save and snapshot-load stop it); ``list`` may also run on the QMP
thread at any time and must not block on a running save.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from mig_core.ext.channel import Channel
from mig_core.plugin.registry import PluginRegistry

#: The entry-point group of snapshot backends (key: the backend's name, e.g. ``dir`` or ``dedup``).
GROUP = "mig_core.snapshot_backends"


@dataclass(frozen=True)
class SnapshotInfo:
    """One committed snapshot as ``x-query-snapshots`` and ``mig snapshot list`` show it."""

    tag: str
    #: bytes the snapshot occupies in this backend (shared pages counted once per backend, not per tag)
    size: int
    #: seconds since the epoch when it was committed
    date: float
    #: bytes of RAM the snapshot holds
    vm_state_size: int


class SnapshotBackend(ABC):
    """One storage node that holds named snapshots. Plugins subclass this."""

    #: The name in the ``mig_core.snapshot_backends`` group.
    name: ClassVar[str]

    def __init__(self, node_name: str, options: Mapping[str, str]) -> None:
        """``options`` are the backend's own settings (e.g. ``dir``), checked here: a bad one raises
        ``ValueError`` with a text naming the option."""
        self.node_name = node_name
        self.options = dict(options)

    @abstractmethod
    def list(self) -> list[SnapshotInfo]:
        """Every committed snapshot, oldest first."""

    def exists(self, tag: str) -> bool:
        return any(s.tag == tag for s in self.list())

    @abstractmethod
    def open_write(self, tag: str) -> Channel:
        """A new, empty, seekable channel for ``tag``'s stream (positioned writes: mapped-ram); not yet
        visible under ``tag`` until ``commit``."""

    @abstractmethod
    def commit(self, tag: str, vm_state_size: int) -> SnapshotInfo:
        """Make what ``open_write`` received the snapshot ``tag`` (replacing nothing: the caller checked)."""

    @abstractmethod
    def abandon(self, tag: str) -> None:
        """Throw away an uncommitted write of ``tag`` (a failed or cancelled save)."""

    @abstractmethod
    def open_read(self, tag: str) -> Channel:
        """A seekable channel reading the committed snapshot ``tag``; ``KeyError`` if there is none."""

    @abstractmethod
    def delete(self, tag: str) -> None:
        """Remove the committed snapshot ``tag``; ``KeyError`` if there is none."""


def load(registry: PluginRegistry, name: str) -> type[SnapshotBackend]:
    """The backend class serving ``name``; logs its class and distribution. ``PluginNotFound`` naming the
    group and the name if none does."""
    return registry.load_class(GROUP, name, SnapshotBackend)
