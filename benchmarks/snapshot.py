"""Snapshot benchmarks (``make bench WHICH=snapshot``), each beside its limit measured in the same run.

1. snapshot-save and snapshot-load of 1 GiB random RAM (dir and dedup backends), against a plain
   sequential file write (4 MiB writes + fsync) and read of 1 GiB on the same file system.
2. Storage of 10 snapshots of 1 GiB random RAM with 1 % of the pages changed between them, dedup
   against dir, as a multiple of one image.
3. Background snapshot of 1 GiB random RAM to a file while 2 vCPUs write 256 MiB/s: its time and downtime
   against the plain file write, and the workload's rate and longest stall before and during it.
4. cpr-reboot of a 4 GiB machine whose RAM is a shared file (x-ignore-shared): downtime from the old
   process's STOP to the new process's RESUME.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.multifd import plain_file_io
from mig_core.testing import Host, connect, run_job, vcpu_records, wait_for_status

GIB = 1 << 30
ENV = {"MIG_LOG_LEVEL": "info"}


def _job_seconds(host: Host, job_id: str) -> float:
    """From the job's running to its concluded status, by the host's own log clock."""
    import datetime

    stamps = {e["new"]: e["timestamp"] for e in host.log_events() if e.get("event") == "job_status"
              and e.get("job") == job_id}
    t0, t1 = (datetime.datetime.fromisoformat(stamps[k].replace("Z", "+00:00")) for k in ("running", "concluded"))
    return (t1 - t0).total_seconds()


async def _timed_job(tmp: Path, command: str, name: str, *host_args: str) -> float:
    """Start a 1 GiB host, run one snapshot job on node snap0 (tag ``t``), stop the host; the job's seconds."""
    h = Host(tmp, "--ram", "1G", *host_args, name=name, env=ENV)
    try:
        c = await connect(h.sock)
        info = await run_job(c, command, {"job-id": "job", "tag": "t", "vmstate": "snap0", "devices": ["snap0"]},
                             timeout=600)
        assert "error" not in info, info
        await c.execute("quit")  # the next host takes the snapshot directory's lock
        h.proc.wait(30)
        return _job_seconds(h, "job")
    finally:
        h.stop()


async def save_and_load(tmp: Path, backend: str) -> dict[str, float]:
    spec = ("--snapshot-dir", f"{tmp}/snaps-{backend},backend={backend}")
    save_s = await _timed_job(tmp, "snapshot-save", f"save-{backend}", "--ram-fill", "random", *spec)
    load_s = await _timed_job(tmp, "snapshot-load", f"load-{backend}", "--mem-prealloc", *spec)
    return {"save_s": save_s, "load_s": load_s}


def threaded_file_io(tmp: Path, threads: int = 2, size: int = GIB) -> tuple[float, float]:
    """The limit with mig's own advantage: ``threads`` threads writing (pwrite, 4 MiB at a time, then fsync)
    and reading (preadv) their share of one file, as the snapshot's page threads do."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp / "threaded.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    chunk = 4 << 20
    share = size // threads

    def write(i: int) -> None:
        mv = memoryview(data)
        for off in range(i * share, (i + 1) * share, chunk):
            os.pwrite(fd, mv[off:off + chunk], off)

    def read(i: int) -> None:
        mv = memoryview(buf)
        for off in range(i * share, (i + 1) * share, chunk):
            os.preadv(fd, [mv[off:off + chunk]], off)

    buf = np.ones(size, dtype=np.uint8)
    try:
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(write, range(threads)))
            os.fsync(fd)
            w = time.perf_counter() - t
            t = time.perf_counter()
            list(pool.map(read, range(threads)))
            r = time.perf_counter() - t
    finally:
        os.close(fd)
        path.unlink()
    return w, r


def save_load_table(reps: int = 3) -> list[dict[str, Any]]:
    rows = []
    for backend in ("dir", "dedup"):
        got, plain = [], []
        for _ in range(reps):
            with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmp:
                one, two = plain_file_io(Path(tmp)), threaded_file_io(Path(tmp))
                plain.append((min(one[0], two[0]), min(one[1], two[1])))  # the faster of the two ways
                got.append(asyncio.run(save_and_load(Path(tmp), backend)))
        save = statistics.median(g["save_s"] for g in got)
        load = statistics.median(g["load_s"] for g in got)
        write = statistics.median(p[0] for p in plain)
        read = statistics.median(p[1] for p in plain)
        rows.append({"backend": backend, "save_s": save, "write_s": write, "load_s": load, "read_s": read})
    return rows


def _stored(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def series_storage(size: int = GIB, n: int = 10, change: float = 0.01) -> dict[str, Any]:
    """Save ``n`` snapshots of one machine, ``change`` of its pages rewritten between them, with each backend."""
    from mig_core.engine.snapshot.ram import save_ram, shapes
    from mig_core.ext import snapshot_backend
    from mig_core.machine.machine import Machine
    from mig_core.plugin.registry import PluginRegistry

    out: dict[str, Any] = {}
    for backend in ("dir", "dedup"):
        with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmp:
            m = Machine()
            b = m.add_ram("ram", size)
            rng = np.random.default_rng(3)
            b.array[:] = rng.integers(0, 256, size, dtype=np.uint8)
            node = snapshot_backend.load(PluginRegistry(), backend)("n", {"dir": f"{tmp}/store"})
            sizes, seconds = [], []
            for i in range(n):
                if i:
                    pages = rng.choice(b.npages, int(b.npages * change), replace=False)
                    b.pages[pages] = rng.integers(0, 256, (len(pages), b.page_size), dtype=np.uint8)
                t = time.perf_counter()
                w = node.begin(f"s{i}", shapes(m))
                save_ram(m, w, 2, lambda: None, lambda done, total: None)
                w.put_vmstate(b"")
                w.commit()
                seconds.append(time.perf_counter() - t)
                sizes.append(_stored(Path(tmp) / "store"))
            node.close()
            m.close()
            out[backend] = {"one": sizes[0], "all": sizes[-1], "ratio": sizes[-1] / sizes[0],
                            "first_s": seconds[0], "later_s": statistics.median(seconds[1:])}
    return out


async def background(tmp: Path, vcpus: int = 2, rate: str = "256M") -> dict[str, Any]:
    """One background snapshot of a running 1 GiB machine; the workload's pages/s and longest stall before
    and during it (from the vCPU records in RAM)."""
    h = Host(tmp, "--ram", "1G", "--ram-fill", "random", "--vcpus", str(vcpus), "--dirty-rate", rate,
             name="bg", env=ENV)
    try:
        c = await connect(h.sock)
        await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "background-snapshot", "state": True}]})

        async def sample() -> tuple[float, int, int]:
            recs = await vcpu_records(c, vcpus, tmp / "rec")
            return time.monotonic(), sum(r[2] for r in recs), max(r[3] for r in recs)

        t0, p0, _ = await sample()
        await asyncio.sleep(2)
        t1, p1, gap_before = await sample()
        await c.execute("migrate", {"uri": f"file:{tmp}/bg.img"})
        info = await wait_for_status(c, {"completed", "failed"}, timeout=600)
        t2, p2, gap_after = await sample()
        assert info["status"] == "completed", info
        await c.disconnect()
        return {"total_ms": info["total-time"], "downtime_ms": info["downtime"], "setup_ms": info["setup-time"],
                "rate_before": (p1 - p0) / (t1 - t0), "rate_during": (p2 - p1) / (t2 - t1),
                "gap_before_ms": gap_before / 1e6, "gap_during_ms": gap_after / 1e6}
    finally:
        h.stop()


async def cpr_downtime(tmp: Path, size: str = "4G") -> dict[str, Any]:
    """Old process (shared-file RAM) saved with cpr-reboot; a new process, started beforehand with
    ``--incoming defer``, loads it. Downtime: the old one's STOP event to the new one's RESUME event."""
    ram = ("--ram", f"pc.ram={size},backing=file,path=/dev/shm/mig-bench-cpr.ram")
    old = Host(tmp, *ram, "--ram-fill", "random", "--cap", "x-ignore-shared=on", "--param", "mode=cpr-reboot",
               name="cpr-old", env=ENV)
    new = Host(tmp, *ram, "--cap", "x-ignore-shared=on", "--incoming", "defer", name="cpr-new", env=ENV)
    try:
        a, b = await connect(old.sock), await connect(new.sock)
        stamps: dict[str, float] = {}

        done = asyncio.get_running_loop().create_future()

        async def watch_old() -> None:  # the operator's fastest path: start the new process on the event
            async for ev in a.events:
                t = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
                if ev["event"] == "STOP":
                    stamps["stop"] = t
                elif ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed"):
                    done.set_result(ev["data"]["status"])
                    return

        async def watch_new() -> None:
            async for ev in b.events:
                if ev["event"] == "RESUME":
                    stamps["resume"] = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
                    return

        wa, wb = asyncio.create_task(watch_old()), asyncio.create_task(watch_new())
        await a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await asyncio.sleep(0.2)
        await a.execute("migrate", {"uri": f"file:{tmp}/cpr.img"})
        assert await asyncio.wait_for(done, 120) == "completed"
        await b.execute("migrate-incoming", {"uri": f"file:{tmp}/cpr.img"})
        info = await wait_for_status(a, {"completed", "failed"}, timeout=120)
        await wait_for_status(b, {"completed", "failed"}, timeout=120)
        await asyncio.wait_for(asyncio.gather(wa, wb), 30)
        image = (tmp / "cpr.img").stat().st_size
        await a.disconnect()
        await b.disconnect()
        return {"downtime_ms": (stamps["resume"] - stamps["stop"]) * 1000, "source_ms": info.get("downtime"),
                "image_bytes": image}
    finally:
        old.stop()
        new.stop()
        Path("/dev/shm/mig-bench-cpr.ram").unlink(missing_ok=True)


def main() -> None:
    print("### Snapshot save and load, 1 GiB random RAM (median of 3)\n")
    print("Limit: the faster of a plain file write (4 MiB writes + fsync) and read, and the same by 2 threads "
          "(as the snapshot's page threads), of 1 GiB on the same file system, same run. Times: the job's "
          "running → concluded.\n")
    print("| backend | save s | write s | write / save | load s | read s | read / load |")
    print("|---|---|---|---|---|---|---|")
    for r in save_load_table():
        print(f"| {r['backend']} | {r['save_s']:.2f} | {r['write_s']:.2f} | {r['write_s'] / r['save_s']:.2f} | "
              f"{r['load_s']:.2f} | {r['read_s']:.2f} | {r['read_s'] / r['load_s']:.2f} |")
    print("\n### 10 snapshots of 1 GiB random RAM, 1 % of the pages changed between them\n")
    print("| backend | one image MiB | ten snapshots MiB | × one image | first save s | later saves s |")
    print("|---|---|---|---|---|---|")
    for backend, r in series_storage().items():
        print(f"| {backend} | {r['one'] >> 20} | {r['all'] >> 20} | {r['ratio']:.3f} | {r['first_s']:.2f} | "
              f"{r['later_s']:.2f} |")
    print("\n### Background snapshot, 1 GiB random RAM to a file, 2 vCPUs writing 256 MiB/s (median of 3)\n")
    runs, plain = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmp:
            plain.append(plain_file_io(Path(tmp))[0])
            runs.append(asyncio.run(background(Path(tmp))))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("| total ms (incl. fault server start) | downtime ms | plain write + fsync ms | workload pages/s before | "
          "during | longest stall before ms | longest stall by the end ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {med['total_ms']:.0f} | {med['downtime_ms']:.0f} | {statistics.median(plain) * 1000:.0f} | "
          f"{med['rate_before']:.0f} | {med['rate_during']:.0f} | {med['gap_before_ms']:.1f} | "
          f"{med['gap_during_ms']:.1f} |")
    print("\n### cpr-reboot, 4 GiB shared-file RAM on tmpfs (x-ignore-shared), random contents (median of 3)\n")
    runs = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmp:
            runs.append(asyncio.run(cpr_downtime(Path(tmp))))
    print("| | downtime ms (old STOP → new RESUME) | old side (stop → completed) ms | stream file MiB |")
    print("|---|---|---|---|")
    print(f"| median | {statistics.median(r['downtime_ms'] for r in runs):.1f} | "
          f"{statistics.median(r['source_ms'] for r in runs):.0f} | "
          f"{statistics.median(r['image_bytes'] for r in runs) / (1 << 20):.1f} |")
    print(f"\nruns: {[round(r['downtime_ms'], 1) for r in runs]}")
