"""The replication extension point (``mig_core.replication``): keeping a secondary in lockstep (COLO).

After a completed migration with the ``x-colo`` capability the source becomes
the primary and the destination the secondary. Both run the same program. The
engine moves the state (checkpoints, heartbeats, failover); the replication
method decides what to do with the program's output: the primary's messages
are held until the secondary produced the same, and a divergence asks for a
checkpoint at once.

The engine calls ``output`` on the primary's vCPU threads, ``peer_output`` on
its return-path thread, and the rest on the COLO thread. ``checkpoint_started``
and ``checkpoint_done`` bracket a checkpoint with the primary stopped.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from mig_core.plugin.registry import PluginRegistry

#: The entry-point group of replication methods (key: ``colo`` for QEMU's).
GROUP = "mig_core.replication"


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


@dataclass
class CompareStats:
    """What the comparison did so far (``x-query-colo-stats``)."""

    #: primary messages held now, waiting for the secondary's
    queue_depth: int = 0
    #: the most held at once
    max_queue_depth: int = 0
    #: messages compared equal and released
    matched: int = 0
    #: messages released at a checkpoint or a failover without a match
    released_unmatched: int = 0
    #: divergences found (each asked for a checkpoint)
    mismatches: int = 0
    #: checkpoints asked for because the queue reached its limit
    queue_full: int = 0


class Replication(ABC):
    """One replication method for one side. Plugins subclass this.

    ``release`` lets messages out to the world, in order; ``request_checkpoint(reason)`` asks the engine
    for a checkpoint now; ``queue_limit`` bounds how many messages may wait for comparison.
    """

    #: The name in the ``mig_core.replication`` group.
    name: ClassVar[str]

    def __init__(self, role: Role, release: Callable[[Iterable[bytes]], None],
                 request_checkpoint: Callable[[str], None], queue_limit: int) -> None:
        self.role = role
        self.release = release
        self.request_checkpoint = request_checkpoint
        self.queue_limit = queue_limit

    @abstractmethod
    def output(self, packet: bytes) -> None:
        """Primary: the program emitted ``packet``; release it once the secondary's matches, or hold it."""

    @abstractmethod
    def peer_output(self, packet: bytes) -> None:
        """Primary: the secondary's program emitted ``packet`` (in the order it did)."""

    @abstractmethod
    def held(self) -> list[bytes]:
        """Primary: the messages held now, in order (a checkpoint carries them to the secondary)."""

    def checkpoint_started(self) -> None:
        """Primary: the checkpoint began (both sides stopped): what is held now travels with it, and the
        secondary's earlier messages no longer count. The primary may run again before ``checkpoint_done``."""

    @abstractmethod
    def checkpoint_done(self) -> None:
        """Primary: the secondary loaded the checkpoint: release what it carried, compare afresh from it."""

    @abstractmethod
    def failover(self) -> None:
        """This side survives its peer: release what is held and let every later message straight out."""

    def stats(self) -> CompareStats:
        return CompareStats()

    def close(self) -> None:
        """Replication ended, however it ended."""


def load(registry: PluginRegistry, name: str) -> type[Replication]:
    """The replication class serving ``name``; logs its class and distribution. ``PluginNotFound`` naming
    the group and the name if none does."""
    return registry.load_class(GROUP, name, Replication)
