"""The machine model host software hands to mig: RAM blocks, devices, vCPU threads, run state."""

from __future__ import annotations

import os
import re
import uuid as uuid_mod
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog

from mig_core.block.node import BlockNode
from mig_core.errors import PluginNotFound
from mig_core.ext import dirty_tracker
from mig_core.ext.dirty_tracker import DirtyTracker, TrackerChoice
from mig_core.ext.snapshot_backend import SnapshotBackend
from mig_core.machine.block_data import BlockDataDevice
from mig_core.machine.blockers import Blocker, MigrationBlockers
from mig_core.machine.device import Device, DeviceRegistry
from mig_core.machine.output import OutputPort
from mig_core.machine.runstate import RunStateMachine
from mig_core.machine.vcpu import VcpuController
from mig_core.machine.write_witness import WriteWitness
from mig_core.memory.ram import Backing, RAMBlock, allocate, from_buffer
from mig_core.plugin.registry import PluginRegistry
from mig_core.schema.common import RunState

log = structlog.get_logger("mig.machine")

#: QEMU's well-formed id (node names, job ids): a letter, then letters, digits, '-', '.', '_'.
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")

__all__ = ["Machine", "RAMBlock", "Backing", "Device", "block_layout"]


class Machine:
    """RAM, devices, vCPUs and run state of one program; the migration engine works on this."""

    def __init__(self, *, runstate: RunState = RunState.RUNNING, uuid: str | None = None,
                 registry: PluginRegistry | None = None) -> None:
        self.uuid = str(uuid_mod.UUID(uuid)) if uuid else str(uuid_mod.UUID(int=0))
        self.blocks: list[RAMBlock] = []
        self.devices = DeviceRegistry()
        #: reasons this machine must not migrate now (QEMU's migrate_add_blocker)
        self.blockers = MigrationBlockers(lambda: list(self.devices))
        self.vcpus = VcpuController()
        self.run = RunStateMachine(runstate)
        self.run.add_listener(self._follow_runstate)
        if not self.run.running:
            self.vcpus.hold()  # vCPUs that register now park until the machine runs
        self.registry = registry or PluginRegistry.from_environment()
        #: Set by a host that calls ``mark_dirty`` after every write (enables the ``host`` tracker).
        self.host_marks_writes = False
        #: A tracker name to use instead of auto-selection (``MIG_DIRTY_TRACKER``).
        self.tracker_name: str | None = os.environ.get("MIG_DIRTY_TRACKER") or None
        #: How an operator gets per-vCPU dirty attribution on this host (added to dirty-limit's refusals).
        self.attribution_hint = ""
        self._tracker: DirtyTracker | None = None
        #: watches fresh preallocated RAM for writes until an incoming load asks (``watch_for_writes``)
        self._witness: WriteWitness | None = None
        #: the blocker mig registered because no dirty tracker can serve this machine (``start_tracking``)
        self._tracking_blocker: Blocker | None = None
        #: Storage nodes by node name (snapshot-save's ``devices`` and ``vmstate`` name them).
        self.nodes: dict[str, SnapshotBackend] = {}
        #: block nodes (files written through mig, with dirty bitmaps), by node name
        self.block_nodes: dict[str, BlockNode] = {}
        #: the program's outbound messages (released at once, or held by COLO until compared)
        self.output = OutputPort()

    # -- RAM -------------------------------------------------------------------

    def add_ram(self, name: str, size: int, **kwargs: Any) -> RAMBlock:
        """Allocate a RAM block (anonymous with huge pages unless the arguments say otherwise) and add it."""
        self._check_new_block(name)
        block = allocate(name, size, **kwargs)
        self.blocks.append(block)
        return block

    def add_host_ram(self, name: str, buffer: Any, **kwargs: Any) -> RAMBlock:
        """Add the host's own buffer as a RAM block."""
        self._check_new_block(name)
        block = from_buffer(name, buffer, **kwargs)
        self.blocks.append(block)
        return block

    def _check_new_block(self, name: str) -> None:
        if any(b.name == name for b in self.blocks):
            raise ValueError(f"a RAM block named '{name}' already exists")
        if self._tracker is not None:
            raise RuntimeError("RAM blocks cannot be added while dirty tracking runs")

    def block(self, name: str) -> RAMBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no RAM block named '{name}'")

    @property
    def ram_size(self) -> int:
        return sum(b.size for b in self.blocks)

    def guest_physical(self, addr: int, size: int) -> list[tuple[RAMBlock, int, int]]:
        """(block, offset, length) pieces of a guest-physical range: blocks laid end to end in order."""
        if addr < 0 or size < 0 or addr + size > self.ram_size:
            raise ValueError(f"range {addr:#x}+{size:#x} is outside guest RAM (size {self.ram_size:#x})")
        pieces, base = [], 0
        for b in self.blocks:
            lo, hi = max(addr, base), min(addr + size, base + b.size)
            if lo < hi:
                pieces.append((b, lo - base, hi - lo))
            base += b.size
        return pieces

    # -- dirty tracking --------------------------------------------------------------

    def tracker_class(self) -> type[DirtyTracker]:
        """The tracker that would serve this machine (named, or the best that works here)."""
        choice: TrackerChoice = dirty_tracker.select(self.blocks, self.registry, name=self.tracker_name,
                                               host_marks_writes=self.host_marks_writes)
        return choice.cls

    def tracker(self) -> DirtyTracker:
        """The machine's dirty tracker, chosen and started on first use (the write witness ends first: both
        need the blocks' userfaultfd registration)."""
        if self._tracker is None:
            self.release_write_witness()
            self._tracker = self.tracker_class()(self.blocks)
        return self._tracker

    def start_tracking(self) -> bool:
        """Start dirty tracking now (not at the first migration), so arming it costs no setup time later.

        Where no tracker can serve these blocks, mig registers a migration blocker naming why instead, and
        returns False: ``migrate`` and ``snapshot-save`` are then refused with that reason before anything
        starts (and ``query-migrate`` lists it), not failed in their setup."""
        try:
            self.tracker()
        except (ValueError, PluginNotFound) as e:
            if self._tracking_blocker is None:
                self._tracking_blocker = self.blockers.add(f"dirty tracking is not available: {e}")
            return False
        return True

    def release_tracker(self) -> bool:
        """Make the running dirty tracker let go of RAM (see ``DirtyTracker.release``); False if none runs."""
        if self._tracker is None:
            return False
        self._tracker.release()
        return True

    def reacquire_tracker(self) -> None:
        """Undo ``release_tracker``: the tracker takes RAM back and reports every page once."""
        if self._tracker is not None:
            self._tracker.reacquire()

    # -- what a destination holds ---------------------------------------------------------

    def watch_for_writes(self) -> list[str]:
        """Watch this machine's fresh preallocated blocks for writes (``WriteWitness``): for a host that will
        receive a migration, right after allocating RAM and before writing any. ``held_runs`` then knows which
        pages may hold data without reading them. Returns the names of the blocks watched."""
        if self._witness is None and self._tracker is None:
            self._witness = WriteWitness(self.blocks)
        return self._witness.watched if self._witness is not None else []

    def release_write_witness(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """End the write witness (before RAM is written in bulk or registered otherwise); the pages it saw
        written, per watched block, as half-open runs."""
        witness, self._witness = self._witness, None
        return witness.written_runs() if witness is not None else {}

    def held_runs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per block but shared files: the pages that may hold data, as half-open runs. Those written since
        the write witness started where it watched the block, else every populated page; ends the witness."""
        written = self.release_write_witness()
        return {b.name: written[b.name] if b.name in written else b.populated_runs()
                for b in self.blocks if not b.shared_file}

    def mark_dirty(self, block: str, offset: int, length: int) -> None:
        """The host wrote ``length`` bytes at ``offset`` of ``block`` (needed by the ``host`` tracker)."""
        t = self._tracker
        if t is not None and hasattr(t, "mark_dirty"):
            t.mark_dirty(block, offset, length)

    def mark_pages(self, block: str, pages: Any) -> None:
        """The host wrote these whole pages of ``block`` (an index array; for the ``host`` tracker)."""
        t = self._tracker
        if t is not None and hasattr(t, "mark_pages"):
            t.mark_pages(block, pages)

    # -- storage nodes --------------------------------------------------------------------

    def add_snapshot_node(self, node: SnapshotBackend) -> None:
        """Offer a snapshot backend as the storage node ``node.node_name``."""
        name = node.node_name
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"Invalid node name '{name}': a letter first, then letters, digits, '-', '.', '_'")
        if name in self.nodes:
            raise ValueError(f"node-name '{name}' is already in use")
        self.nodes[name] = node

    def add_block_node(self, node: BlockNode, migrate: bool = False) -> None:
        """Offer a block node (a file written through mig, with dirty bitmaps) as ``node.name``; with
        ``migrate`` its contents migrate with the machine (storage the destination does not share: add it
        with ``migrate`` there too)."""
        name = node.name
        if not _NODE_NAME.fullmatch(name):
            raise ValueError(f"Invalid node name '{name}': a letter first, then letters, digits, '-', '.', '_'")
        if name in self.nodes or name in self.block_nodes:
            raise ValueError(f"node-name '{name}' is already in use")
        if self.run.state is not RunState.INMIGRATE:  # an incoming machine's nodes wait for the migration
            node.activate()
        self.block_nodes[name] = node
        if migrate:
            self.add_device(BlockDataDevice(node))

    def activate_block_nodes(self) -> None:
        """Take every block node's write lock (the machine takes over its storage); NodeLockError if one
        is held by another process (the nodes activated before it stay active)."""
        for node in self.block_nodes.values():
            node.activate()

    def inactivate_block_nodes(self) -> None:
        """Flush and unlock every block node (a source handing its storage to the destination)."""
        for node in self.block_nodes.values():
            node.inactivate()

    # -- devices and run state --------------------------------------------------------

    def add_device(self, dev: Device) -> None:
        self.devices.register(dev)

    def _follow_runstate(self, old: RunState, new: RunState, running: bool) -> None:
        if running:
            self.vcpus.resume_all()
        elif old is RunState.RUNNING:
            self.vcpus.stop_all()

    def close(self) -> None:
        self.release_write_witness()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        for b in self.blocks:
            b.close()
        self.blocks.clear()
        for node in self.nodes.values():
            node.close()
        self.nodes.clear()
        for bnode in self.block_nodes.values():
            bnode.close()
        self.block_nodes.clear()


def block_layout(blocks: Sequence[RAMBlock]) -> list[tuple[str, int, int]]:
    """(name, size, page size) of each block, in order: what source and destination must agree on."""
    return [(b.name, b.size, b.page_size) for b in blocks]
