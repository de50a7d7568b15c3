"""Live-migration benchmarks between two ``mig run`` processes, each against a limit measured alongside."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.hosts import qmp_clients, rss
from benchmarks.multifd import GIB, UNPACED, raw_loopback, system_congestion
from mig_core.testing import Host, migrate_and_wait, vcpu_records, wait_for_status

ENV = {"MIG_LOG_LEVEL": "info"}


async def _migrate(tmp: Path, src_args: tuple[str, ...], dst_args: tuple[str, ...], params: dict,
                   watch: bool = False) -> dict:
    """One migration between two ``mig run`` processes; ``watch``: also read the vCPUs' true gap."""
    s = Host(tmp, *src_args, name="src", env=ENV)
    d = Host(tmp, *dst_args, "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(s, d) as (src, dst):
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
        await src.execute("migrate-set-parameters", params)
        await src.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "return-path", "state": True}]})
        # waits for the MIGRATION event: a poller would take CPU from the migration on these 2 cores
        info = await migrate_and_wait(src, {"uri": f"tcp:127.0.0.1:{port}"})
        expected = None
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        out = {"info": info, "expected_downtime": expected}
        for ev in s.log_events():  # the value the source computed last, just before it switched over
            if ev.get("event") == "switchover":
                out["expected_downtime"] = ev["expected_downtime_ms"]
        if watch:
            await asyncio.sleep(0.2)
            recs = await vcpu_records(dst, 2, tmp / "rec")
            out["true_gap_ms"] = max(r[3] for r in recs) / 1e6
        out["rss"] = {name: rss(h.proc.pid) for name, h in (("src", s), ("dst", d))}
    return out


def idle_rss(args: tuple[str, ...]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        h = Host(Path(tmp), *args, name="idle", env=ENV)
        time.sleep(1.0)
        used = rss(h.proc.pid)
        h.stop()
        return used


THROUGHPUT_REPS = 11  # the issue asks for at least 7; this machine's noise (±15 %) wants more


def throughput(reps: int = THROUGHPUT_REPS) -> dict:
    """1 GiB random RAM over tcp loopback (destination preallocated), interleaved with the raw limit."""
    raw, raw_unpaced, mig, rss = [], [], [], []
    for _ in range(reps):
        raw.append(raw_loopback())
        raw_unpaced.append(raw_loopback(congestion=UNPACED))
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(_migrate(Path(tmp), ("--ram", "1G", "--ram-fill", "random"),
                                     ("--ram", "1G", "--mem-prealloc", "-S"), {"max-bandwidth": 0}))
        mig.append(r["info"]["total-time"] / 1000)
        rss.append(r["rss"])
    idle = idle_rss(("--ram", "1G", "--ram-fill", "random"))
    return {"raw_s": statistics.median(raw), "raw_unpaced_s": statistics.median(raw_unpaced),
            "mig_s": statistics.median(mig),
            "mig_gib_s": 1 / statistics.median(mig),
            "rss_over_idle": {k: statistics.median(r[k] for r in rss) - idle for k in ("src", "dst")},
            "idle_rss": idle}


def recorder_cost(reps: int = 9) -> dict:
    """The flight recorder's cost: the 1 GiB migration with it on (writing JSON lines on both sides) and
    off, interleaved; total-time medians."""
    on, off = [], []
    for _ in range(reps):
        for flag, out in ((True, on), (False, off)):
            with tempfile.TemporaryDirectory() as tmp:
                rec = ("--flight-dir", f"{tmp}/rec") if flag else ("--no-flight-record",)
                r = asyncio.run(_migrate(Path(tmp), ("--ram", "1G", "--ram-fill", "random", *rec),
                                         ("--ram", "1G", "--mem-prealloc", "-S", *rec), {"max-bandwidth": 0}))
                out.append(r["info"]["total-time"])
    return {"on_ms": statistics.median(on), "off_ms": statistics.median(off)}


def special_ram(reps: int = 7) -> dict:
    """1 GiB never touched, and 1 GiB written with zeros (preallocated): total-time."""
    out = {}
    for label, args in (("never-touched", ("--ram", "1G")), ("zeros", ("--ram", "1G", "--mem-prealloc"))):
        times = []
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as tmp:
                r = asyncio.run(_migrate(Path(tmp), args, ("--ram", "1G", "-S"), {"max-bandwidth": 0}))
            times.append(r["info"]["total-time"])
        out[label] = statistics.median(times)
    return out


def downtime(reps: int = 7) -> list[dict]:
    """Workload dirtying 50 MiB/s on 2 vCPUs; downtime-limit 300 and 20 ms."""
    rows = []
    for limit in (300, 20):
        got = []
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as tmp:
                wl = ("--ram", "512M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "50M")
                r = asyncio.run(_migrate(Path(tmp), wl, wl, {"max-bandwidth": 0, "downtime-limit": limit},
                                         watch=True))
            got.append((r["info"]["downtime"], r["true_gap_ms"], r["expected_downtime"], r["info"]["total-time"]))
        med = [statistics.median(x[i] for x in got) for i in range(4)]
        rows.append({"limit": limit, "downtime": med[0], "true_gap": med[1], "expected": med[2], "total": med[3],
                     "runs": got})
    return rows


def main() -> None:
    t = throughput()
    print(f"### Live migration, 1 GiB random RAM, tcp loopback, one channel (median of {THROUGHPUT_REPS}, "
          "interleaved)\n")
    print("| | seconds | GiB/s |\n|---|---|---|")
    print(f"| raw Python loopback (sendall 4 MiB / recv_into, two processes), system congestion control "
          f"({system_congestion()}) | {t['raw_s']:.3f} | {1 / t['raw_s']:.2f} |")
    print(f"| the same with {UNPACED.decode()} (what mig uses on loopback) | {t['raw_unpaced_s']:.3f} | "
          f"{1 / t['raw_unpaced_s']:.2f} |")
    print(f"| mig migrate (total-time), destination preallocated | {t['mig_s']:.3f} | {t['mig_gib_s']:.2f} |")
    print(f"\nratio mig / raw: {t['raw_s'] / t['mig_s']:.2f} (system congestion control), "
          f"{t['raw_unpaced_s'] / t['mig_s']:.2f} ({UNPACED.decode()})")
    print(f"RSS above an idle host with the same RAM ({t['idle_rss'] >> 20} MiB): source "
          f"{t['rss_over_idle']['src'] / GIB * 100:.1f} %, destination {t['rss_over_idle']['dst'] / GIB * 100:.1f} % "
          "of RAM")
    c = recorder_cost()
    print("\n### Flight recorder cost: the same migration with it on (JSON lines on both sides) and off "
          "(median of 9, interleaved)\n")
    print(f"on {c['on_ms']:.0f} ms, off {c['off_ms']:.0f} ms: {100 * (c['on_ms'] - c['off_ms']) / c['off_ms']:+.1f} %")
    s = special_ram()
    print("\n### 1 GiB of RAM that costs nothing (total-time, ms, median of 7)\n")
    print(f"never touched: {s['never-touched']:.0f} ms; written with zeros (preallocated source): {s['zeros']:.0f} ms")
    print("\n### Downtime under a workload dirtying 50 MiB/s (2 vCPUs, 512 MiB, median of 7)\n")
    print("| downtime-limit | downtime | true gap (heartbeats) | last expected-downtime | total-time |")
    print("|---|---|---|---|---|")
    for r in downtime():
        print(f"| {r['limit']} | {r['downtime']:.0f} | {r['true_gap']:.0f} | {r['expected']} | {r['total']:.0f} |")


if __name__ == "__main__":
    os.environ.update(ENV)
    main()
