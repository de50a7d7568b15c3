"""The uffd-wp tracker is installed, discovered, preferred, exact, and refuses blocks it cannot serve."""

from pathlib import Path

import numpy as np
import pytest

from mig_core import PluginRegistry
from mig_core.ext import dirty_tracker
from mig_core.host import uffd
from mig_core.memory.ram import Backing, allocate
from mig_core.testing.contracts import DirtyTrackerContract


def test_discovered_and_preferred():
    reg = PluginRegistry()
    assert reg.choice("dirty_trackers", "uffd-wp").distribution == "mig-tracker-uffd-wp"
    blocks = [allocate("ram", 1 << 20)]
    assert dirty_tracker.select(blocks, reg).cls.name == "uffd-wp"


def test_exact_pages_and_release():
    cls = PluginRegistry().load("mig_core.dirty_trackers", "uffd-wp")
    for backing in (Backing.MEMFD, Backing.ANONYMOUS):
        b = allocate("ram", 4 << 20, backing=backing)
        t = cls([b])
        c = t.consumer("c")
        c.collect()
        idx = np.array([0, 1, 2, 500, 1023])
        b.pages[idx, 7] = 1
        b.view[600 * 4096] = 9  # a write through a memoryview is seen as well
        assert list(c.collect().pages["ram"]) == [0, 1, 2, 500, 600, 1023]
        assert len(c.collect().pages["ram"]) == 0
        t.close()
        assert uffd.REGISTRY.registration(b) is None  # the registration went with the tracker
        b.close()


def _huge_bytes(block) -> int:
    """AnonHugePages of the mapping that holds ``block`` (from /proc/self/smaps)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= block.address < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif("[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="transparent huge pages are disabled on this machine")
def test_huge_pages_are_tracked_per_page():
    """The default block is anonymous with huge pages; uffd-wp still reports the single 4 KiB pages written."""
    b = allocate("ram", 16 << 20)
    plain = allocate("plain", 16 << 20, transparent_hugepages=False)
    cls = PluginRegistry().load("mig_core.dirty_trackers", "uffd-wp")
    try:
        b.array[:] = 1
        plain.array[:] = 1
        assert _huge_bytes(b) >= 2 << 20 and _huge_bytes(plain) == 0
        t = cls([b])
        c = t.consumer("c")
        assert len(c.collect().pages["ram"]) == b.npages
        b.pages[[3, 700, 3000], 9] = 2  # three pages in three different huge pages
        assert list(c.collect().pages["ram"]) == [3, 700, 3000]
        assert len(c.collect().pages["ram"]) == 0
        t.close()
    finally:
        b.close()
        plain.close()


class TestContract(DirtyTrackerContract):
    """mig's dirty-tracker contract (mig_core.testing.contracts), as every tracker plugin runs it."""

    name = "uffd-wp"
    distribution = "mig-tracker-uffd-wp"


def test_file_pages_in_memory_are_mapped_before_protection(tmp_path):
    """A file block whose data is in the page cache: arming maps it first, so reading every page afterwards
    costs no fault per page (a marker on each would), holes stay unmapped, and only writes are reported."""
    import resource

    path = tmp_path / "ram.img"
    data = np.random.default_rng(1).integers(0, 256, 2 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())  # 512 pages of data in the page cache
        f.truncate(4 << 20)  # then 512 pages of hole
    b = allocate("ram", 4 << 20, backing=Backing.FILE, path=str(path))
    cls = PluginRegistry().load("mig_core.dirty_trackers", "uffd-wp")
    t = cls([b])
    try:
        c = t.consumer("c")
        c.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert int(b.array[:2 << 20].view(np.uint64)[::512].sum()) >= 0  # one word of each data page
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < 64, faults  # against 512 with a marker on every page
        assert np.array_equal(b.array[:2 << 20], data)
        b.pages[[5, 700], 0] = 7  # a data page and a hole page
        assert list(c.collect().pages["ram"]) == [5, 700]
    finally:
        t.close()
        b.close()


def test_map_resident_maps_only_what_memory_holds(tmp_path):
    path = tmp_path / "ram.img"
    with open(path, "wb") as f:
        f.write(b"\x01" * (1 << 20))
        f.truncate(2 << 20)
    b = allocate("ram", 2 << 20, backing=Backing.FILE, path=str(path))
    try:
        assert b.map_resident() == 256  # the data; the hole holds nothing to map
        anon = allocate("anon", 1 << 20)
        assert anon.map_resident() == 0  # anonymous memory is mapped where it exists already
        anon.close()
    finally:
        b.close()


def test_unwritten_since_proves_only_what_no_write_or_harvest_touched():
    """The proof a multifd channel needs to keep a packet compressed in place: no page of the range written
    since the epoch, and nothing re-armed since (a harvest hides a write made before it); refused after
    release and close, and for ranges or blocks the tracker does not hold."""
    cls = PluginRegistry().load("mig_core.dirty_trackers", "uffd-wp")
    for backing in (Backing.MEMFD, Backing.ANONYMOUS):
        b, other = allocate("ram", 4 << 20, backing=backing), allocate("other", 1 << 20, backing=backing)
        b.pages[:, 0] = 1
        t = cls([b])
        c = t.consumer("c")
        c.collect()
        epoch = t.write_epoch()
        assert epoch is not None
        assert t.unwritten_since(epoch, b, 0, b.npages)
        assert not t.unwritten_since(epoch, other, 0, other.npages)  # not tracked here
        assert not t.unwritten_since(epoch, b, b.npages - 1, 2)  # past the block's end
        b.pages[300, 5] = 2  # one byte of one page
        assert not t.unwritten_since(epoch, b, 300, 1)
        assert not t.unwritten_since(epoch, b, 256, 256)
        assert t.unwritten_since(epoch, b, 0, 300) and t.unwritten_since(epoch, b, 301, b.npages - 301)
        c.collect()  # re-arms page 300: the old epoch proves nothing any more, a new one does
        assert not t.unwritten_since(epoch, b, 0, 300)
        epoch = t.write_epoch()
        assert epoch is not None and t.unwritten_since(epoch, b, 256, 256)
        b.view[400 * 4096 + 17] = 3  # through a memoryview too
        assert not t.unwritten_since(epoch, b, 400, 1)
        t.release()
        assert t.write_epoch() is None and not t.unwritten_since(epoch, b, 0, 1)
        t.reacquire()
        c.collect()
        epoch = t.write_epoch()
        assert epoch is not None and t.unwritten_since(epoch, b, 0, b.npages)
        t.close()
        assert t.write_epoch() is None and not t.unwritten_since(epoch, b, 0, 1)
        b.close()
        other.close()
