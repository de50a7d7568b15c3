"""The built-in ``host`` dirty tracker: the host software reports each write with ``Machine.mark_dirty``.

Registered under ``mig_core.dirty_trackers`` like any plugin's tracker; exact, and it attributes writes to the
vCPU thread that made them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from mig_core.ext.dirty_tracker import HarvestingTracker
from mig_core.machine.vcpu import current_vcpu
from mig_core.memory.ram import RAMBlock


class HostTracker(HarvestingTracker):
    """The host calls ``mark_dirty(block, offset, length)`` after it writes; exact, attributes vCPUs."""

    name = "host"
    attributes_vcpus = True
    preference = 20

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        super().__init__(blocks)
        self._by_name = {b.name: b for b in self.blocks}
        self._marks = {b.name: np.zeros(b.npages, dtype=bool) for b in self.blocks}
        self._vcpu: dict[int, int] = {}
        self._mark_lock = threading.Lock()

    @classmethod
    def unavailable(cls, blocks: Sequence[RAMBlock], host_marks_writes: bool) -> str | None:
        return None if host_marks_writes else "the host does not report its writes with mark_dirty()"

    def mark_dirty(self, block: str, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` of ``block`` were written (by the calling vCPU, if any)."""
        b = self._by_name.get(block)
        if b is None:
            raise KeyError(f"no RAM block named '{block}'")
        if offset < 0 or length < 0 or offset + length > b.size:
            raise ValueError(f"mark_dirty range {offset}+{length} is outside RAM block '{block}' ({b.size} bytes)")
        if length == 0:
            return
        first, last = offset // b.page_size, (offset + length - 1) // b.page_size
        vcpu = current_vcpu()
        with self._mark_lock:
            marks = self._marks[block][first:last + 1]
            if vcpu is not None:  # like a dirty ring: a page counts once per window, for the vCPU that dirtied it
                self._vcpu[vcpu] = self._vcpu.get(vcpu, 0) + int(np.count_nonzero(~marks))
            marks[:] = True

    def mark_pages(self, block: str, pages: np.ndarray) -> None:
        """Record writes to whole pages of ``block`` given as an index array (vectorised ``mark_dirty``)."""
        b = self._by_name.get(block)
        if b is None:
            raise KeyError(f"no RAM block named '{block}'")
        if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= b.npages):
            raise ValueError(f"mark_pages: page outside RAM block '{block}' ({b.npages} pages)")
        vcpu = current_vcpu()
        with self._mark_lock:
            marks = self._marks[block]
            if vcpu is not None:
                self._vcpu[vcpu] = self._vcpu.get(vcpu, 0) + int(np.count_nonzero(~marks[pages]))
            marks[pages] = True

    def harvest(self) -> tuple[dict[str, np.ndarray], dict[int, int]]:
        with self._mark_lock:
            marks, self._marks = self._marks, {b.name: np.zeros(b.npages, dtype=bool) for b in self.blocks}
            vcpu, self._vcpu = self._vcpu, {}
        return {name: np.flatnonzero(m) for name, m in marks.items()}, vcpu
