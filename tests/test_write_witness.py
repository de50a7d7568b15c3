"""The write witness: which pages of a fresh preallocated block were written since, without reading them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mig_core.host import uffd
from mig_core.machine.machine import Machine
from mig_core.memory.ram import Backing

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                               reason="transparent huge pages are off here: the witness watches huge mappings only")


def _huge_or_skip(b) -> None:
    """The witness watches huge mappings only; a kernel short of huge pages (fragmented memory) gives none."""
    from mig_core.memory import pagemap

    starts, ends = pagemap.scanner().scan_runs(b.address, b.size, b.page_size, category_mask=pagemap.PAGE_IS_HUGE,
                                               return_mask=pagemap.PAGE_IS_HUGE)
    if int((ends - starts).sum()) < 0.9 * b.npages:
        pytest.skip("the kernel mapped this block with few huge pages (memory fragmented): nothing to watch")


def _runs(pair):
    return list(zip(pair[0].tolist(), pair[1].tolist(), strict=True))


@needs_thp
def test_written_pages_are_known_without_reading_and_the_witness_lets_go():
    m = Machine()
    watched = m.add_ram("ram0", 64 << 20, prealloc=True)  # anonymous, huge pages
    lazy = m.add_ram("ram1", 4 << 20)  # never populated: nothing to watch
    shm = m.add_ram("ram2", 4 << 20, backing=Backing.MEMFD, prealloc=True)  # a memfd says where its data is
    try:
        _huge_or_skip(watched)
        assert m.watch_for_writes() == ["ram0"]
        for p in (3, 777, 16000):
            watched.pages[p, 100] = 1
        shm.pages[9, 0] = 1
        held = m.held_runs()
        assert _runs(held["ram0"]) == [(3, 4), (777, 778), (16000, 16001)]  # exact, in a huge mapping
        assert _runs(held["ram1"]) == [] and _runs(held["ram2"]) == [(0, shm.npages)]  # populated: all
        assert uffd.REGISTRY.registration(watched) is None  # let go before the load writes
        assert m.held_runs()["ram0"][0].tolist() == [0]  # unwatched now: every populated page
        assert lazy.npages  # (kept alive)
    finally:
        m.close()


@needs_thp
def test_the_dirty_tracker_takes_over_from_the_witness():
    m = Machine()
    b = m.add_ram("ram0", 64 << 20, prealloc=True)
    try:
        _huge_or_skip(b)
        assert m.watch_for_writes() == ["ram0"]
        m.tracker_name = "uffd-wp"
        c = m.tracker().consumer("migration", sends=True)  # the witness ends: the block is free for the tracker
        assert uffd.REGISTRY.registration(b) is not None
        assert len(c.collect().pages["ram0"]) == b.npages
        b.pages[5, 0] = 2
        assert c.collect().pages["ram0"].tolist() == [5]
        assert m.watch_for_writes() == []  # never beside a running tracker
        assert np.array_equal(m.held_runs()["ram0"][0], [0])
    finally:
        m.close()
