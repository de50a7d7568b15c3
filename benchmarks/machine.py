"""Data-path benchmarks: dirty trackers, uffd-wp write cost, page batches, vCPU stop latency, page scans."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from mig_core.ext.channel import Channel
from mig_core.machine.machine import Machine
from mig_core.machine.vcpu import VcpuController
from mig_core.memory.ram import Backing, allocate
from mig_core.stream.placement import CopyPlacer
from mig_core.stream.reader import StreamReader
from mig_core.stream.writer import StreamWriter

GIB = 1 << 30


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def trackers(size: int = GIB, reps: int = 5) -> list[dict]:
    """Cost of one collect() per GiB, at 0/1/10/100 % of pages dirtied since the last one."""
    rows = []
    for name in ("uffd-wp", "hash", "host"):
        m = Machine()
        b = m.add_ram("ram", size)
        b.pages[:, 0] = 1  # populate every page
        m.tracker_name = name
        m.host_marks_writes = name == "host"
        c = m.tracker().consumer("bench", sends=False)
        c.collect()
        rng = np.random.default_rng(0)
        row = {"tracker": name}
        for pct in (0, 1, 10, 100):
            n = b.npages * pct // 100
            samples = []
            for _ in range(reps):
                idx = np.sort(rng.choice(b.npages, n, replace=False)) if n else np.empty(0, dtype=np.int64)
                b.pages[idx, 1] += 1
                if name == "host":
                    starts = idx * b.page_size
                    for s in starts.tolist():
                        m.mark_dirty("ram", s, 1)
                t = time.perf_counter()
                r = c.collect()
                samples.append((time.perf_counter() - t) * 1000)
                assert r.total == n, (name, pct, r.total, n)
            row[f"{pct}%"] = statistics.median(samples) * GIB / size
        rows.append(row)
        m.close()
    return rows


def uffd_write_cost(size: int = GIB) -> dict:
    """What tracking costs a writer: one u64 per page, and a full memset, tracked vs untracked."""
    out = {}
    for tracked in (False, True):
        m = Machine()
        b = m.add_ram("ram", size)
        b.array[:] = 1
        if tracked:
            m.tracker_name = "uffd-wp"
            m.tracker().consumer("bench").collect()
        u64 = b.array.view(np.uint64)
        stride = b.page_size // 8
        t = time.perf_counter()
        u64[::stride] = 7
        per_page = (time.perf_counter() - t) / b.npages * 1e6
        if tracked:
            m.tracker()._consumers[0].collect()  # protect again
        t = time.perf_counter()
        b.array.fill(3)
        memset = size / (time.perf_counter() - t) / GIB
        out["tracked" if tracked else "untracked"] = {"us_per_page": per_page, "memset_gib_s": memset}
        del u64
        m.close()
    return out


class _MemoryChannel(Channel):
    """A channel that copies into (and reads back from) one preallocated buffer: the kernel's copy, no I/O."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.buf = np.empty(capacity, dtype=np.uint8)
        self.w = self.r = 0

    def _sendv(self, buffers):
        n = 0
        for b in buffers:
            v = np.frombuffer(b, dtype=np.uint8)
            self.buf[self.w:self.w + len(v)] = v
            self.w += len(v)
            n += len(v)
        return n

    def _recv_into(self, view):
        n = min(view.nbytes, self.w - self.r)
        np.frombuffer(view, dtype=np.uint8)[:n] = self.buf[self.r:self.r + n]
        self.r += n
        return n

    def _unblock(self):
        pass

    def close(self):
        pass


def page_batches(size: int = 256 << 20, reps: int = 7) -> list[dict]:
    """Encode (writer) and decode (reader + placement) throughput against memcpy of the same bytes."""
    src = allocate("ram", size)
    dst = allocate("ram", size)
    src.array[:] = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    dst.array[:] = 0
    rows = []
    memcpy_ms = median_ms(lambda: np.copyto(dst.array, src.array), reps)
    for label, pages in (("contiguous", np.arange(src.npages)),
                         ("every other page", np.arange(0, src.npages, 2)),
                         ("random 25 %", np.sort(np.random.default_rng(1).choice(src.npages, src.npages // 4,
                                                                                 replace=False)))):
        nbytes = len(pages) * src.page_size
        chan = _MemoryChannel(size + (16 << 20))

        def encode() -> None:
            chan.w = 0
            w = StreamWriter(chan, [src])
            w.write_pages(src, pages)

        def decode() -> None:
            chan.r = 0
            r = StreamReader(chan, [dst], CopyPlacer([dst]))
            r._blocks = [dst]
            while chan.r < chan.w:
                r.next()

        enc = median_ms(encode, reps)
        dec = median_ms(decode, reps)
        assert np.array_equal(dst.pages[pages], src.pages[pages])
        rows.append({"pattern": label, "MiB": nbytes >> 20, "encode_gib_s": nbytes / enc / 1e3 / (1 << 30) * 1e3 * 1e3,
                     "decode_gib_s": nbytes / dec / 1e3 / (1 << 30) * 1e3 * 1e3,
                     "memcpy_gib_s": size / memcpy_ms / 1e3 / (1 << 30) * 1e3 * 1e3})
    src.close()
    dst.close()
    return rows


def vcpu_stop_latency(n: int = 8, stops: int = 50) -> dict:
    c = VcpuController()
    stop = threading.Event()

    def body(v):
        x = 0
        while not stop.is_set():
            x += 1
            v.safe_point()

    threads = c.run(body, n)
    while len(c.vcpus) < n:
        time.sleep(0.01)
    lat = []
    for _ in range(stops):
        lat.append(c.stop_all() * 1000)
        c.resume_all()
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    lat.sort()
    return {"vcpus": n, "median_ms": statistics.median(lat), "p90_ms": lat[int(0.9 * len(lat))], "max_ms": lat[-1]}


def populated_scan(reps: int = 9) -> dict:
    out = {}
    for backing in (Backing.MEMFD, Backing.ANONYMOUS):
        b = allocate("ram", GIB, backing=backing)
        out[backing.value] = median_ms(b.populated_pages, reps)
        assert len(b.populated_pages()) == 0
        b.close()
    return out
