"""The secondary's RAM cache: a copy of RAM as of the last checkpoint.

A checkpoint's pages land here, not in RAM, while the secondary still runs.
Only once the whole checkpoint is in does the flush copy into RAM every page
the checkpoint brought and every page the secondary itself wrote since the
last checkpoint: RAM is then exactly the primary's, and a checkpoint cut in
the middle leaves RAM as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock
from mig_core.stream.placement import PagePlacer, one_run


class RamCache(PagePlacer):
    """One (npages, page_size) copy per block; received pages are recorded per checkpoint."""

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        super().__init__(blocks)
        self.copies = {b.name: np.empty((b.npages, b.page_size), dtype=np.uint8) for b in blocks}
        for b in blocks:  # the state after the initial migration: what the first checkpoint builds on
            np.copyto(self.copies[b.name], b.pages)

    def direct_view(self, block: RAMBlock, pages: np.ndarray) -> memoryview | None:
        first = one_run(pages)
        if first is None:
            return None
        return memoryview(self.copies[block.name][first:first + len(pages)].reshape(-1).data)

    def place(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> None:
        if data is not None:
            self.copies[block.name][pages] = data
        self.received[block.name][pages] = True

    def place_zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        self.copies[block.name][pages] = 0
        self.received[block.name][pages] = True

    def flush(self, written: Mapping[str, np.ndarray]) -> int:
        """Copy into RAM what this checkpoint brought and what the secondary wrote (``written``: page
        indices per block); start the next checkpoint's record. Returns the pages copied."""
        total = 0
        for b in self.blocks:
            mask = self.received[b.name]
            mine = written.get(b.name)
            if mine is not None and len(mine):
                mask[mine] = True
            idx = np.flatnonzero(mask)
            total += len(idx)
            if len(idx):
                _copy_runs(self.copies[b.name], b.pages, idx)
            mask[:] = False
        return total


#: pages per gather when the flush copies scattered pages (1 MiB of 4 KiB pages)
GATHER_PAGES = 256


def _copy_runs(src: np.ndarray, dst: np.ndarray, idx: np.ndarray) -> None:
    """dst[idx] = src[idx], run by run (slices copy without the temporaries fancy indexing makes)."""
    starts, ends = pages_to_runs(idx)
    if len(starts) > len(idx) // 4:  # scattered pages: gathers small enough that their temporary stays cached
        for at in range(0, len(idx), GATHER_PAGES):
            part = idx[at:at + GATHER_PAGES]
            dst[part] = src[part]
        return
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        dst[s:e] = src[s:e]
