"""The replication extension point (``mig_core.replication``): keeping a secondary in lockstep (COLO).

After a completed migration with the ``x-colo`` capability the source becomes
the primary and the destination the secondary. Both run; the replication
method decides when their outputs diverge and asks for a checkpoint (the
primary stops, sends what changed since the last checkpoint, the secondary
applies it all at once), and on a failure promotes the survivor
(``x-colo-lost-heartbeat``). The engine moves the state; the method supplies
the policy and the comparison.

Callbacks run on the COLO thread of each side; vCPUs run except inside
``checkpoint_started``/``checkpoint_done``, which bracket a checkpoint with
the primary stopped.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar

from mig_core.plugin.registry import PluginRegistry

#: The entry-point group of replication methods (key: ``colo`` for QEMU's).
GROUP = "mig_core.replication"


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Replication(ABC):
    """One replication method for one side. Plugins subclass this."""

    #: The name in the ``mig_core.replication`` group.
    name: ClassVar[str]

    def __init__(self, role: Role) -> None:
        self.role = role

    @abstractmethod
    def wait_for_checkpoint(self, timeout: float) -> bool:
        """Primary: block until the outputs diverge or ``timeout`` seconds pass (x-checkpoint-delay);
        True if a checkpoint is needed now, False on timeout (a periodic checkpoint follows anyway)."""

    def checkpoint_started(self) -> None:
        """Both sides: a checkpoint begins (primary stopped; buffered output is held)."""

    def checkpoint_done(self) -> None:
        """Both sides: the secondary applied the checkpoint; held output may be released."""

    @abstractmethod
    def failover(self) -> None:
        """This side survives its peer: stop comparing and run alone (x-colo-lost-heartbeat)."""

    def close(self) -> None:
        """Replication ended, however it ended."""


def load(registry: PluginRegistry, name: str) -> type[Replication]:
    """The replication class serving ``name``; logs its class and distribution. ``PluginNotFound`` naming
    the group and the name if none does."""
    return registry.load_class(GROUP, name, Replication)
