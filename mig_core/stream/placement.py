"""Where received pages land: one interface (plain copy now; UFFDIO_COPY for postcopy and a
checkpoint cache for COLO later), which also keeps a received-pages bitmap per block."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from mig_core.memory.ram import RAMBlock


def one_run(pages: np.ndarray) -> int | None:
    """The first page if ``pages`` is one run (increasing, first to last in n steps: nothing repeated or
    missing), so a batch can be received straight into place; else None."""
    first, n = int(pages[0]), len(pages)
    if int(pages[-1]) - first + 1 != n or (n > 2 and not (pages[1:] > pages[:-1]).all()):
        return None
    return first


class PagePlacer(ABC):
    """Puts received pages into RAM blocks and remembers which pages arrived."""

    #: Whether the placer can read what a page holds now (XBZRLE pages are applied on top of it).
    reads_back = True

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        self.blocks = list(blocks)
        self.received = {b.name: np.zeros(b.npages, dtype=bool) for b in self.blocks}

    def direct_view(self, block: RAMBlock, pages: np.ndarray) -> memoryview | None:
        """A view to receive ``pages`` straight into, when they can land without staging (else None)."""
        return None

    @abstractmethod
    def place(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> None:
        """Pages arrived: ``data`` holds one row per page, or None if they were received via direct_view."""

    @abstractmethod
    def place_zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        """These pages are zero now."""


class CopyPlacer(PagePlacer):
    """Copies pages into the block (precopy); zero pages free their memory instead of being written."""

    def direct_view(self, block: RAMBlock, pages: np.ndarray) -> memoryview | None:
        first = one_run(pages)
        if first is None:
            return None
        return block.view[first * block.page_size:(first + len(pages)) * block.page_size]

    def place(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> None:
        if data is not None:
            block.pages[pages] = data
        self.received[block.name][pages] = True

    def place_zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        block.zero_pages(np.sort(pages))
        self.received[block.name][pages] = True
