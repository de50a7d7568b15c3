"""The machine model: RAM blocks, vCPU stop/throttle/resume, run-state callbacks, devices."""

from __future__ import annotations

import mmap
import threading
import time

import msgpack
import pytest

from mig_core.host import uffd
from mig_core.machine.device import Device, DeviceRegistry, DeviceSection, DeviceStateError
from mig_core.machine.machine import Machine, block_layout
from mig_core.machine.vcpu import VcpuController, VcpuStopTimeout
from mig_core.memory.ram import Backing, BackingError, allocate, from_buffer
from mig_core.schema.common import RunState
from mig_core.testing import wait_until

# --- RAM --------------------------------------------------------------------------


@pytest.mark.parametrize("backing", [Backing.MEMFD, Backing.ANONYMOUS, Backing.FILE])
def test_blocks_of_each_backing(backing, tmp_path):
    kw = {"path": tmp_path / "ram.img"} if backing is Backing.FILE else {}
    b = allocate("ram", 1 << 20, backing=backing, **kw)
    try:
        assert (b.npages, b.page_size, b.backing) == (256, mmap.PAGESIZE, backing)
        assert len(b.populated_pages()) == 0
        b.pages[7] = 1
        b.array[10 * 4096 + 5] = 2
        b.view[200 * 4096] = 3
        assert list(b.populated_pages()) == [7, 10, 200]
        assert (b.fd >= 0) == (backing is not Backing.ANONYMOUS)
        b.discard()
        assert len(b.populated_pages()) == 0 and not b.array.any()
    finally:
        b.close()


def test_prealloc_populates_every_page():
    b = allocate("ram", 4 << 20, prealloc=True)
    try:
        assert len(b.populated_pages()) == b.npages
    finally:
        b.close()


@pytest.mark.parametrize("backing", [Backing.MEMFD, Backing.ANONYMOUS, Backing.FILE])
@pytest.mark.parametrize("touched", [0, 1, 64, 65, 120])
def test_populated_runs_expand_and_mask_alike(backing, touched, tmp_path):
    """populated_pages and a destination's held-pages mask agree with the pages written, on both sides of
    the few-runs shortcut (one slice or range per run up to pagemap.FEW_RUNS runs, vectorised beyond)."""
    import numpy as np

    from mig_core.memory import pagemap

    kw = {"path": tmp_path / "ram.img"} if backing is Backing.FILE else {}
    b = allocate("ram", 1 << 20, backing=backing, **kw)
    try:
        written = np.sort(np.random.default_rng(touched).choice(b.npages, size=touched, replace=False))
        written[written % 2 == 1] -= 1  # even pages only: every written page is a run of its own
        written = np.unique(written)
        for p in written.tolist():
            b.pages[p] = 1
        starts, ends = b.populated_runs()
        assert len(starts) == len(written)
        assert b.populated_pages().tolist() == written.tolist()
        assert pagemap.runs_to_pages(starts, ends).dtype == np.int64
        mask = pagemap.runs_mask(starts, ends, b.npages)
        assert np.flatnonzero(mask).tolist() == written.tolist()
        # adjacent runs and a run that ends at the block's end stay one span
        whole = pagemap.runs_mask(np.array([0, 5, 9]), np.array([5, 9, b.npages]), b.npages)
        assert whole.all()
        many = np.arange(0, 2 * (pagemap.FEW_RUNS + 1), 2)
        assert np.flatnonzero(pagemap.runs_mask(many, many + 1, b.npages)).tolist() == many.tolist()
        assert pagemap.runs_to_pages(many, many + 1).tolist() == many.tolist()
    finally:
        b.close()


def test_union_of_page_sets_with_and_without_an_empty_side():
    """A switchover merges what the pass left with what the last sync found: the same answer whether either
    side is empty (then no bitmap is built) or both hold pages, overlapping ones included."""
    import numpy as np

    from mig_core.memory.pagemap import union_pages

    a, b, none = np.array([1, 5, 9]), np.array([0, 5, 12]), np.empty(0, dtype=np.int64)
    assert union_pages(a, b, 16).tolist() == [0, 1, 5, 9, 12]
    assert union_pages(a, none, 16).tolist() == [1, 5, 9] and union_pages(none, b, 16).tolist() == [0, 5, 12]
    assert len(union_pages(none, none, 16)) == 0


def test_never_touched_gib_costs_nothing_to_scan():
    b = allocate("big", 1 << 30)
    try:
        assert len(b.populated_pages()) == 0  # its speed is measured in benchmarks/, not asserted here
        assert b.array.nbytes == 1 << 30
    finally:
        b.close()


def test_host_buffers_and_their_limits():
    buf = mmap.mmap(-1, 1 << 16)
    b = from_buffer("host", buf)
    assert b.backing is Backing.HOST and b.npages == 16
    b.pages[1] = 5
    assert buf[4096] == 5  # the host's own memory
    with pytest.raises(BackingError, match="userfaultfd missing \\(postcopy\\) needs RAM block 'host' to be "
                                           "memfd or anonymous or file-backed, but it is host-backed"):
        uffd.REGISTRY.register(b, uffd.Mode.MISSING, owner="postcopy")
    with pytest.raises(ValueError, match="read-only"):
        from_buffer("ro", bytes(4096))
    with pytest.raises(ValueError, match="must start on a page boundary"):
        from_buffer("odd", memoryview(buf)[1:4097])
    with pytest.raises(ValueError, match="size 100 must be a positive multiple of its page size 4096"):
        from_buffer("small", bytearray(100))
    with pytest.raises(ValueError, match="page size 1000 must be a power of two"):
        allocate("x", 4096, page_size=1000)


def test_machine_blocks_and_guest_physical_layout():
    m = Machine()
    try:
        a = m.add_ram("a", 8192)
        b = m.add_ram("b", 4096 * 4, backing=Backing.ANONYMOUS)
        with pytest.raises(ValueError, match="a RAM block named 'a' already exists"):
            m.add_ram("a", 4096)
        assert block_layout(m.blocks) == [("a", 8192, 4096), ("b", 16384, 4096)]
        pieces = m.guest_physical(4096, 8192)
        assert [(p[0].name, p[1], p[2]) for p in pieces] == [("a", 4096, 4096), ("b", 0, 4096)]
        with pytest.raises(ValueError, match="outside guest RAM"):
            m.guest_physical(0, 8192 + 16384 + 1)
        assert m.ram_size == 8192 + 16384 and a is m.block("a") and b is m.block("b")
    finally:
        m.close()


# --- vCPUs and run state ---------------------------------------------------------------


def spin_vcpus(c: VcpuController, n: int, stop: threading.Event, counts: list[int]):
    def body(v):
        while not stop.is_set():
            counts[v.index] += 1
            v.safe_point()

    return c.run(body, n)


def test_stop_and_resume_eight_vcpus():
    c = VcpuController()
    stop = threading.Event()
    counts = [0] * 8
    threads = spin_vcpus(c, 8, stop, counts)
    try:
        while len(c.vcpus) < 8:
            time.sleep(0.01)
        for _ in range(5):
            latency = c.stop_all(timeout=5)
            assert latency >= 0 and all(v.parked for v in c.vcpus)
            frozen = list(counts)
            time.sleep(0.05)
            assert counts == frozen  # nobody runs while stopped
            c.resume_all()
            wait_until(lambda: all(x > y for x, y in zip(counts, frozen, strict=True)))  # every vCPU runs again
        assert c.last_stop_latency == latency
    finally:
        stop.set()
        c.resume_all()
        for t in threads:
            t.join()


def test_stop_times_out_naming_the_late_vcpu():
    c = VcpuController()
    release = threading.Event()
    registered = threading.Event()

    def never_safe():
        v = c.register("stubborn")
        registered.set()
        release.wait()
        v.safe_point()
        v.unregister()

    t = threading.Thread(target=never_safe)
    t.start()
    registered.wait()
    with pytest.raises(VcpuStopTimeout, match="vCPUs did not reach a safe point within 0.2 s: stubborn"):
        c.stop_all(timeout=0.2)
    assert not c.stopped  # a failed stop leaves the machine running
    release.set()
    t.join()


def test_throttle_takes_its_share_and_ends():
    """At 80 % each vCPU sleeps 0.8 / 0.2 x 10 ms = 40 ms per round (at least: a sleep never ends early
    unless woken); rounds are counted, not fitted into a time window."""
    c = VcpuController()
    stop = threading.Event()
    counts = [0] * 2
    threads = spin_vcpus(c, 2, stop, counts)
    try:
        wait_until(lambda: len(c.vcpus) == 2 and all(counts))
        c.set_throttle(80)
        wait_until(lambda: all(v.throttle_rounds >= 5 for v in c.vcpus), timeout=60)
        for v in c.vcpus:
            assert v.last_throttle_sleep >= 0.040 and v.throttled_seconds >= 0.040 * v.throttle_rounds
        c.set_throttle(0)
        # once each vCPU passed two more safe points, no sleep from before can still be under way
        marks = [v.safe_points for v in c.vcpus]
        wait_until(lambda: all(v.safe_points >= m + 2 for v, m in zip(c.vcpus, marks, strict=True)))
        before = [v.throttle_rounds for v in c.vcpus]
        passed = [v.safe_points for v in c.vcpus]
        wait_until(lambda: all(v.safe_points >= p + 100 for v, p in zip(c.vcpus, passed, strict=True)))
        assert [v.throttle_rounds for v in c.vcpus] == before  # full speed: 100 safe points, no sleep
        with pytest.raises(ValueError):
            c.set_throttle(100)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_run_state_stops_vcpus_and_calls_listeners():
    m = Machine(runstate=RunState.PRELAUNCH)
    seen = []
    m.run.add_listener(lambda old, new, running: seen.append((old.value, new.value, running)))
    stop = threading.Event()
    counts = [0]
    threads = spin_vcpus(m.vcpus, 1, stop, counts)
    try:
        time.sleep(0.05)
        assert counts[0] == 0  # prelaunch: the vCPU parked at its first safe point
        m.run.cont()
        wait_until(lambda: counts[0] > 0)
        m.run.stop()
        frozen = counts[0]
        time.sleep(0.05)
        assert counts[0] == frozen
        assert seen == [("prelaunch", "running", True), ("running", "paused", False)]
    finally:
        stop.set()
        m.run.cont()
        for t in threads:
            t.join()
        m.close()


# --- devices ----------------------------------------------------------------------


class Counter(Device):
    id = "counter"
    version = 3
    minimum_version = 2

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.loaded_version = 0

    def save_state(self):
        return {"value": self.value, "blob": b"\x00\x01"}

    def load_state(self, state, version):
        self.value = state["value"]
        self.loaded_version = version


def test_device_save_load_and_version_checks():
    src, dst = DeviceRegistry(), DeviceRegistry()
    src.register(Counter(41))
    d = Counter()
    dst.register(d)
    (section,) = src.save_all()
    assert section == DeviceSection("counter", 0, 3, msgpack.packb({"value": 41, "blob": b"\x00\x01"},
                                                                    use_bin_type=True))
    dst.load(section)
    assert (d.value, d.loaded_version) == (41, 3)
    with pytest.raises(DeviceStateError, match="device 'counter' instance 0: the stream has version 4, newer "
                                               "than this host's version 3"):
        dst.load(DeviceSection("counter", 0, 4, section.payload))
    with pytest.raises(DeviceStateError, match="older than the oldest this host loads \\(2\\)"):
        dst.load(DeviceSection("counter", 0, 1, section.payload))
    with pytest.raises(DeviceStateError, match="the stream has state for device 'disk' instance 0, which this "
                                               "host does not have"):
        dst.load(DeviceSection("disk", 0, 1, section.payload))
    with pytest.raises(DeviceStateError, match="corrupt state"):
        dst.load(DeviceSection("counter", 0, 3, b"\xc1"))
    with pytest.raises(ValueError, match="already registered"):
        dst.register(Counter())


def test_buffered_form_is_all_or_nothing():
    src, dst = DeviceRegistry(), DeviceRegistry()
    src.register(Counter(7))
    d = Counter(1)
    dst.register(d)
    buf = src.save_to_buffer()
    dst.load_from_buffer(buf)
    assert d.value == 7
    other = DeviceRegistry()
    c2 = Counter(99)
    other.register(c2)

    class Extra(Device):
        id = "extra"

    src.register(Extra())
    with pytest.raises(DeviceStateError, match="device 'extra' instance 0, which this host does not have"):
        other.load_from_buffer(src.save_to_buffer())
    assert c2.value == 99  # nothing applied from a buffer that failed its checks
    with pytest.raises(DeviceStateError, match="corrupt device state buffer"):
        other.load_from_buffer(b"garbage")


def test_device_state_must_encode():
    class Bad(Device):
        id = "bad"

        def save_state(self):
            return {"x": object()}

    reg = DeviceRegistry()
    reg.register(Bad())
    with pytest.raises(DeviceStateError, match="device 'bad' instance 0: state cannot be encoded"):
        reg.save_all()


def test_uffd_modes_on_memfd_and_anonymous():
    a = allocate("m", 1 << 20, backing=Backing.MEMFD)
    n = allocate("n", 1 << 20, backing=Backing.ANONYMOUS)
    try:
        r1 = uffd.REGISTRY.register(a, uffd.Mode.WP_SYNC, owner="snapshot")
        r2 = uffd.REGISTRY.register(n, uffd.Mode.WP_ASYNC, owner="tracker")
        assert uffd.REGISTRY.registration(a) is r1 and r1.features & uffd.FEATURE_WP_UNPOPULATED
        with pytest.raises(uffd.UffdError, match="already registered .* for wp-sync \\(background snapshot, by "
                                                 "snapshot\\); it cannot also serve wp-async"):
            uffd.REGISTRY.register(a, uffd.Mode.WP_ASYNC, owner="tracker")
        r1.writeprotect()
        r1.writeprotect(protect=False)
        uffd.REGISTRY.unregister(r1)
        uffd.REGISTRY.unregister(r2)
        assert uffd.REGISTRY.registration(a) is None
        r3 = uffd.REGISTRY.register(a, uffd.Mode.MISSING, owner="postcopy")
        uffd.REGISTRY.unregister(r3)
    finally:
        a.close()
        n.close()


def _maps_huge(path, size: int) -> bool:
    """Whether the kernel maps most of ``path`` with huge pages in a fresh read-only mapping (asked over the
    whole file, independently of mig_core's sampling probe)."""
    import os

    import numpy as np

    from mig_core.memory import pagemap

    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(mm)
    try:
        address = int(np.frombuffer(view, dtype=np.uint8).ctypes.data)
        mm.madvise(22)  # MADV_POPULATE_READ
        starts, ends = pagemap.scanner().scan_runs(address, size, 2 << 20, anyof_mask=pagemap.PAGE_IS_HUGE,
                                                   return_mask=pagemap.PAGE_IS_HUGE)
        return 2 * int((ends - starts).sum()) > size // (2 << 20)
    finally:
        view.release()
        mm.close()


def test_a_file_block_is_read_through_a_huge_read_only_mapping_where_the_kernel_makes_one(tmp_path):
    import numpy as np

    size = 8 << 20
    path = tmp_path / "pc.ram"
    data = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(data.tobytes())  # written, not faulted in: large folios where the file system has them
    b = allocate("pc.ram", size, backing=Backing.FILE, path=str(path))
    try:
        b.map_resident()  # what a tracker does first: the writable mapping, page by page
        rv = b.read_view
        # a separate mapping exactly where the kernel maps the file huge (ext4 and others), else the view
        assert (rv is not b.view) == _maps_huge(path, size)
        assert rv.readonly and not b.read_words.flags.writeable
        assert bytes(rv[:4096]) == data[:4096].tobytes()
        b.view[4096:8192] = bytes(4096)  # a write through the tracked mapping is seen by the reads
        b.view[size - 1:size] = b"\x01"
        assert not b.read_words[1].any() and b.read_pages[-1, -1] == 1
        assert b.read_view is rv  # made once
        separate = rv is not b.view
        del rv
        held = b.read_words  # an array of it still in use: it stays mapped, and goes on serving
        b.release_read_view()
        assert _mappings(path) == 1 + separate
        assert int(b.read_words[2, 0]) == int(held[2, 0]) == int(data[8192:8200].view(np.uint64)[0])
        del held
        b.release_read_view()  # the end of a migration: unmapped
        assert _mappings(path) == 1
        assert bytes(b.read_view[:4096]) == data[:4096].tobytes()  # the next migration maps it again
        assert _mappings(path) == 1 + separate
    finally:
        b.close()


def _mappings(path) -> int:
    """How many mappings of ``path`` this process has (/proc/self/maps)."""
    return sum(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


def test_an_anonymous_block_is_read_through_its_own_view():
    b = allocate("pc.ram", 4 << 20)
    try:
        assert b.read_view is b.view
    finally:
        b.close()
