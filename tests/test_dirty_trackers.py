"""Every dirty tracker under concurrent writers: a shadow copy built only from reported pages equals memory."""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

from mig_core.ext import dirty_tracker
from mig_core.ext.dirty_tracker import DirtyTracker
from mig_core.machine.host_tracker import HostTracker
from mig_core.machine.machine import Machine
from mig_core.memory.ram import Backing, BackingError
from mig_core.plugin.registry import PluginRegistry
from mig_core.testing.contracts import DirtyTrackerContract

TRACKERS = ["uffd-wp", "hash", "host"]


def make_machine(tracker: str) -> Machine:
    m = Machine()
    m.add_ram("ram0", 8 << 20, backing=Backing.MEMFD)  # exact populated pages (no huge pages)
    m.add_ram("ram1", 4 << 20, backing=Backing.ANONYMOUS)
    m.blocks[0].pages[:64] = 3  # some state from before tracking starts
    m.tracker_name = tracker
    m.host_marks_writes = tracker == "host"
    return m


class WriteCount:
    """How many writes the writer threads made; a round waits for fresh writes, never for a time window."""

    def __init__(self) -> None:
        self.n = 0
        self.cond = threading.Condition()

    def add(self) -> None:
        with self.cond:
            self.n += 1
            self.cond.notify_all()

    def wait_beyond(self, n: int, timeout: float = 60.0) -> int:
        with self.cond:
            assert self.cond.wait_for(lambda: self.n > n, timeout), "the writer threads made no progress"
            return self.n


def writers(m: Machine, stop: threading.Event, n: int = 3, count: WriteCount | None = None) -> list[threading.Thread]:
    """Threads that write random pages by numpy fancy index, by slices and by memoryview; they mark writes."""

    def body(seed: int) -> None:
        v = m.vcpus.register()
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                b = m.blocks[rng.integers(len(m.blocks))]
                kind = seed % 3
                if kind == 0:
                    idx = rng.integers(0, b.npages, 32)
                    b.pages[idx, rng.integers(0, b.page_size)] = rng.integers(1, 255)
                    for p in idx:
                        m.mark_dirty(b.name, int(p) * b.page_size, 1)
                elif kind == 1:
                    p = int(rng.integers(0, b.npages - 4))
                    b.pages[p:p + 4] = rng.integers(0, 255, (4, b.page_size), dtype=np.uint8)
                    m.mark_dirty(b.name, p * b.page_size, 4 * b.page_size)
                else:
                    off = int(rng.integers(0, b.size - 16))
                    b.view[off:off + 16] = bytes(rng.integers(0, 255, 16, dtype=np.uint8))
                    m.mark_dirty(b.name, off, 16)
                if count is not None:
                    count.add()
                v.safe_point()
        finally:
            v.unregister()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


class Shadow:
    """What a destination would hold after receiving exactly the reported pages."""

    def __init__(self, m: Machine, consumer) -> None:
        self.m, self.consumer = m, consumer
        self.copy = {b.name: np.zeros_like(b.pages) for b in m.blocks}
        self.rounds = 0

    def round(self) -> int:
        report = self.consumer.collect()
        for b in self.m.blocks:
            idx = report.pages[b.name]
            data = b.pages[idx]  # copy first, then deliver that copy
            self.copy[b.name][idx] = data
            self.consumer.sent(b, idx, data)
        self.rounds += 1
        return report.total

    def equals_memory(self) -> bool:
        return all(np.array_equal(self.copy[b.name], b.pages) for b in self.m.blocks)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_shadow_copy_equals_memory(tracker):
    m = make_machine(tracker)
    try:
        t = m.tracker()
        assert t.name == tracker
        mig = Shadow(m, t.consumer("migration", sends=True))
        rate = Shadow(m, t.consumer("dirty-rate"))
        stop = threading.Event()
        count = WriteCount()
        threads = writers(m, stop, count=count)
        seen = 0
        for i in range(24):  # a fixed number of rounds, each after the writers wrote more
            seen = count.wait_beyond(seen)
            mig.round()
            if i % 3 == 0:
                rate.round()  # a second consumer at its own pace never steals the first one's pages
        stop.set()
        for th in threads:
            th.join()
        mig.round()
        rate.round()
        assert mig.equals_memory() and rate.equals_memory()
        assert mig.round() == 0  # nothing written since: nothing reported
    finally:
        m.close()


@pytest.mark.parametrize("tracker", TRACKERS)
def test_first_collect_reports_populated_pages_only(tracker):
    m = make_machine(tracker)
    try:
        c = m.tracker().consumer("c", sends=True)
        r = c.collect()
        assert list(r.pages["ram0"]) == list(range(64))
        assert len(r.pages["ram1"]) == 0
    finally:
        m.close()


@pytest.mark.parametrize("tracker", ["uffd-wp", "host"])
def test_a_first_consumer_costs_no_harvest_and_misses_no_write(tracker):
    """The first consumer of a harvesting tracker starts without a harvest (its first collect reports every
    populated page anyway: one page-table walk of all RAM saved per migration); a later one harvests into
    the older consumers first, so they keep what was written before it came."""
    m = make_machine(tracker)

    def write(block: str, page: int) -> None:
        m.block(block).pages[page] = 7
        if tracker == "host":
            m.mark_dirty(block, page * 4096, 4096)

    try:
        t = m.tracker()
        harvests = 0
        harvest = t.harvest

        def counted() -> tuple[dict[str, np.ndarray], dict[int, int]]:
            nonlocal harvests
            harvests += 1
            return harvest()

        t.harvest = counted  # type: ignore[method-assign]
        write("ram1", 3)  # before any consumer: never-populated memory written
        first = t.consumer("migration", sends=True)
        assert harvests == 0
        write("ram1", 5)  # between the consumer's creation and its first collect
        r = first.collect()
        assert harvests == 1
        assert {3, 5} <= set(r.pages["ram1"].tolist()) and list(r.pages["ram0"]) == list(range(64))
        write("ram1", 9)
        second = t.consumer("dirty-rate")
        assert harvests == 2  # the older consumer's share of the write above is kept
        assert list(first.collect().pages["ram1"]) == [9]
        assert 9 in second.collect().pages["ram1"].tolist()
    finally:
        m.close()


def test_page_changed_and_changed_back_is_not_missed_by_hash():
    m = make_machine("hash")
    try:
        c = m.tracker().consumer("migration", sends=True)
        b = m.blocks[0]
        shadow = Shadow(m, c)
        shadow.round()
        b.pages[5] = 9
        report = c.collect()  # the page is dirty now ...
        assert 5 in report.pages["ram0"]
        sent = b.pages[report.pages["ram0"]]  # ... and this copy is what is delivered
        b.pages[5] = 3  # then it changes back to what the other side held before
        c.sent(b, report.pages["ram0"], sent)
        shadow.copy["ram0"][report.pages["ram0"]] = sent
        assert 5 in c.collect().pages["ram0"]  # differs from what was delivered: reported again
    finally:
        m.close()


def test_host_tracker_attributes_vcpus():
    m = make_machine("host")
    try:
        c = m.tracker().consumer("dirty-limit")
        c.collect()
        done = threading.Barrier(3)

        def vcpu_body(pages: int) -> None:
            v = m.vcpus.register()
            for p in range(pages):
                m.mark_dirty("ram0", (pages * 40 + p) * 4096, 4096)  # disjoint page ranges
                m.mark_dirty("ram0", (pages * 40 + p) * 4096, 16)  # a page counts once per window
            done.wait()
            v.unregister()

        ts = [threading.Thread(target=vcpu_body, args=(n,)) for n in (10, 25)]
        for t in ts:
            t.start()
        done.wait()
        for t in ts:
            t.join()
        m.mark_dirty("ram1", 0, 4096)  # not a vCPU: counted as dirty, attributed to nobody
        r = c.collect()
        assert sorted(r.vcpu_pages.values()) == [10, 25]
        assert len(r.pages["ram0"]) == 35 and list(r.pages["ram1"]) == [0]
        with pytest.raises(ValueError, match="outside RAM block 'ram0'"):
            m.mark_dirty("ram0", 8 << 20, 1)
    finally:
        m.close()


def test_auto_selection_and_refusals():
    m = make_machine("uffd-wp")
    try:
        reg = PluginRegistry()
        choice = dirty_tracker.select(m.blocks, reg)
        assert choice.cls.name == "uffd-wp"  # exact and needs no host cooperation
        assert not choice.cls.attributes_vcpus
        with pytest.raises(ValueError, match="dirty tracker 'host' cannot be used: the host does not report"):
            dirty_tracker.select(m.blocks, reg, name="host")
        reg.disable("uffd-wp")
        choice = dirty_tracker.select(m.blocks, reg)
        assert choice.cls.name == "hash" and "uffd-wp" not in choice.skipped
        assert dirty_tracker.select(m.blocks, reg, host_marks_writes=True).cls is HostTracker
        assert issubclass(choice.cls, DirtyTracker)
    finally:
        m.close()


def test_uffd_wp_and_postcopy_cannot_share_a_block():
    from mig_core.host import uffd

    m = make_machine("uffd-wp")
    try:
        m.tracker()
        with pytest.raises(uffd.UffdError, match="already registered with userfaultfd for wp-async \\(dirty "
                                                 "tracking, by dirty tracker uffd-wp\\); it cannot also serve "
                                                 "missing \\(postcopy\\)"):
            uffd.REGISTRY.register(m.blocks[0], uffd.Mode.MISSING, owner="postcopy")
    finally:
        m.close()
    # closing the tracker released the registration
    m2 = make_machine("uffd-wp")
    try:
        for b in m2.blocks:  # memfd and anonymous memory alike: the page server fills either with UFFDIO_COPY
            uffd.REGISTRY.unregister(uffd.REGISTRY.register(b, uffd.Mode.MISSING, owner="postcopy"))
        host = m2.add_host_ram("lent", mmap.mmap(-1, 1 << 20))  # a buffer of the host's own, page-aligned
        with pytest.raises(BackingError, match="needs RAM block 'lent' to be memfd or anonymous or file-backed, "
                                               "but it is host-backed"):
            uffd.REGISTRY.register(host, uffd.Mode.MISSING, owner="postcopy")
    finally:
        m2.close()


class TestHostTrackerContract(DirtyTrackerContract):
    """The built-in host tracker runs the contract every tracker plugin runs."""

    name = "host"
    distribution = "mig-core"
