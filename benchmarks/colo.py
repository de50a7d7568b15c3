"""COLO benchmarks (``make bench WHICH=colo``).

1. Checkpoint pause (primary stopped to running again) for 1 GiB of RAM with 0.1 %, 1 % and 10 % of it
   written between checkpoints, beside precopy's downtime for the same dirty set in the same run: a
   precopy migration of the same RAM paused before switchover (pause-before-switchover), the same pages
   written, then timed from migrate-continue until the destination has loaded and runs. Both run in one
   process over a real unix socket, no vCPUs: the pages are written by the benchmark itself, so both
   sides of the comparison carry exactly the same set.
2. Checkpoints per second when every output message differs (``mig run --output ...,diverge=1``).
3. Failover time with default heartbeat settings: from the peer's death (SIGKILL) or hang (SIGSTOP) to
   the survivor reporting COLO over and running, seen through QMP polled every 2 ms.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.hosts import qmp_clients
from mig_core.control.manager import MigrationManager
from mig_core.machine.machine import Machine
from mig_core.machine.reference_host import fill
from mig_core.qapi import from_qmp
from mig_core.schema.commands import MigrateArgs, MigrateContinueArgs, MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus as S
from mig_core.schema.parameters import MigrateSetParameters
from mig_core.testing import Host, wait_for_status

GIB = 1 << 30
PAGE = 4096
FRACTIONS = (0.001, 0.01, 0.1)
REPEAT = 5
ENV = {"MIG_LOG_LEVEL": "warning"}


def _machine(runstate: RunState, size: int) -> Machine:
    m = Machine(runstate=runstate)
    m.host_marks_writes = True  # the benchmark marks what it writes: the host tracker serves
    m.add_ram("pc.ram", size)
    return m


def _dirty(m: Machine, fraction: float, rng: np.random.Generator) -> int:
    """Write random data into ``fraction`` of the pages (distinct, random) and mark them."""
    b = m.blocks[0]
    n = max(1, int(b.npages * fraction))
    pages = np.sort(rng.choice(b.npages, n, replace=False))
    b.pages[pages] = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    m.mark_pages(b.name, pages)
    return n


def _caps(mgr: MigrationManager, *names: str) -> None:
    mgr.migrate_set_capabilities(from_qmp(MigrateSetCapabilitiesArgs, {"capabilities": [
        {"capability": n, "state": True} for n in names]}))


def _pair(tmp: Path, size: int, rng: np.random.Generator, *caps: str) -> tuple[MigrationManager, MigrationManager]:
    src_m, dst_m = _machine(RunState.RUNNING, size), _machine(RunState.INMIGRATE, size)
    fill(src_m, "random", seed=int(rng.integers(1 << 31)))
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    for mgr in (src, dst):
        _caps(mgr, *caps)
        mgr.migrate_set_parameters(from_qmp(MigrateSetParameters, {"max-bandwidth": 0,
                                                                   "x-checkpoint-delay": 3600000}))
    src_m.start_tracking()
    dst.migrate_incoming(MigrateIncomingArgs(uri=f"unix:{tmp}/bench.sock"))
    src.migrate(MigrateArgs(uri=f"unix:{tmp}/bench.sock"))
    return src, dst


def _close(*mgrs: MigrationManager) -> None:
    for mgr in mgrs:
        mgr.machine.close()


def precopy_downtimes(size: int = GIB) -> dict[float, list[float]]:
    """ms from migrate-continue (pages written while paused before switchover) to the destination running."""
    rng = np.random.default_rng(7)
    out: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    for fraction in FRACTIONS:
        for _ in range(REPEAT):
            with tempfile.TemporaryDirectory() as tmp:
                src, dst = _pair(Path(tmp), size, rng, "pause-before-switchover", "return-path")
                try:
                    assert src.source.wait_for({S.PRE_SWITCHOVER}, 120), src.source.state
                    _dirty(src.machine, fraction, rng)
                    t0 = time.monotonic()
                    src.migrate_continue(MigrateContinueArgs(state=S.PRE_SWITCHOVER))
                    assert dst.destination.wait_for({S.COMPLETED}, 120), dst.destination.state
                    out[fraction].append((time.monotonic() - t0) * 1000)
                    assert src.source.wait_for({S.COMPLETED}, 120), src.source.state
                finally:
                    _close(src, dst)
    return out


def colo_pauses(size: int = GIB) -> dict[float, list[tuple[float, int, float]]]:
    """The primary's checkpoint pause (ms), pages sent, and ms until the secondary had loaded it, for each
    dirty fraction, ``REPEAT`` times."""
    rng = np.random.default_rng(7)
    out: dict[float, list[tuple[float, int, float]]] = {f: [] for f in FRACTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = _pair(Path(tmp), size, rng, "x-colo")
        try:
            assert src.source.wait_for({S.COLO}, 120), src.source.state
            assert dst.destination.wait_for({S.COLO}, 120), dst.destination.state
            _checkpoint(src)  # the first one also carries what the initial migration's end wrote
            for fraction in FRACTIONS:
                for _ in range(REPEAT):
                    _dirty(src.machine, fraction, rng)
                    fig = _checkpoint(src)
                    out[fraction].append((fig.last_pause_ms, fig.last_pages, fig.last_loaded_ms))
            src.x_colo_lost_heartbeat()
        finally:
            _close(src, dst)
    return out


def _checkpoint(src: MigrationManager) -> Any:
    before = src.colo.figures.checkpoints
    src.xen_colo_do_checkpoint()
    deadline = time.monotonic() + 120
    while src.colo.figures.checkpoints == before:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.001)
    return src.colo.figures


# -- subprocess hosts: mismatch rate and failover ---------------------------------------------------

WORKLOAD = ("--ram", "256M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "16M")


async def _colo_hosts(tmp: Path, output: str) -> tuple[Host, Host]:
    src_h = Host(tmp, *WORKLOAD, "--output", f"{tmp}/p.out,{output}", name="src", env=ENV)
    dst_h = Host(tmp, *WORKLOAD, "--output", f"{tmp}/s.out,{output}", "--incoming", "defer", name="dst", env=ENV)
    return src_h, dst_h


async def _start_colo(src: Any, dst: Any, tmp: Path, delay: int) -> None:
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        await c.execute("migrate-set-parameters", {"x-checkpoint-delay": delay, "max-bandwidth": 0})
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp}/colo.sock"})
    await src.execute("migrate", {"uri": f"unix:{tmp}/colo.sock"})
    await wait_for_status(src, {"colo"}, timeout=120)
    await wait_for_status(dst, {"colo"}, timeout=120)


async def mismatch_rate(seconds: float = 5.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src_h, dst_h = await _colo_hosts(tmp, "rate=1000,diverge=1")
        async with qmp_clients(src_h, dst_h) as (src, dst):
            await _start_colo(src, dst, tmp, 20000)
            s0, t0 = await src.execute("x-query-colo-stats"), time.monotonic()
            await asyncio.sleep(seconds)
            s1, t1 = await src.execute("x-query-colo-stats"), time.monotonic()
            n = s1["checkpoints"] - s0["checkpoints"]
            return {"per_second": n / (t1 - t0), "pause_ms": (s1["total-pause-ms"] - s0["total-pause-ms"]) / max(n, 1),
                    "reasons": s1["reasons"], "mismatches": s1["compare"]["mismatches"]}


async def failover_time(kill: str, how: signal.Signals) -> float:
    """ms from signalling ``kill`` (primary or secondary) until the survivor has COLO over and runs."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src_h, dst_h = await _colo_hosts(tmp, "rate=200")
        async with qmp_clients(src_h, dst_h) as (src, dst):
            await _start_colo(src, dst, tmp, 500)
            while (await src.execute("x-query-colo-stats"))["checkpoints"] < 2:
                await asyncio.sleep(0.05)
            victim, survivor = (src_h, dst) if kill == "primary" else (dst_h, src)
            t0 = time.monotonic()
            os.kill(victim.proc.pid, how)
            while True:
                status = await survivor.execute("query-colo-status")
                if status["mode"] == "none" and (await survivor.execute("query-status"))["status"] == "running":
                    ms = (time.monotonic() - t0) * 1000
                    break
                await asyncio.sleep(0.002)
            if how is signal.SIGSTOP:
                os.kill(victim.proc.pid, signal.SIGKILL)
            return ms


def main() -> None:
    print("### COLO: checkpoint pause against precopy downtime, 1 GiB, same dirty set (ms, median of "
          f"{REPEAT})\n")
    pre = precopy_downtimes()
    colo = colo_pauses()
    print("| dirtied between checkpoints | pages | precopy downtime | COLO checkpoint pause | ratio | goal ≤ 1.5× "
          "| until the secondary loaded it |")
    print("|---|---|---|---|---|---|---|")
    for f in FRACTIONS:
        p = float(np.median(pre[f]))
        c = float(np.median([x for x, _, _ in colo[f]]))
        pages = int(np.median([n for _, n, _ in colo[f]]))
        loaded = float(np.median([x for _, _, x in colo[f]]))
        verdict = "met" if c <= 1.5 * p else "not met"
        print(f"| {f * 100:g} % | {pages} | {p:.1f} | {c:.1f} | {c / p:.2f}× | {verdict} | {loaded:.1f} |")
    m = asyncio.run(mismatch_rate())
    print("\n### COLO under a workload whose every message differs "
          "(1000 messages/s, 256 MiB, 16 MiB/s dirtied)\n")
    print(f"{m['per_second']:.1f} checkpoints per second, {m['pause_ms']:.1f} ms pause each; "
          f"reasons {m['reasons']}; {m['mismatches']} mismatches")
    print("\n### COLO failover with default heartbeat settings (ms from the signal to the survivor running alone)\n")
    print("| peer | SIGKILL | SIGSTOP (hung) |\n|---|---|---|")
    for who in ("primary", "secondary"):
        k = asyncio.run(failover_time(who, signal.SIGKILL))
        s = asyncio.run(failover_time(who, signal.SIGSTOP))
        print(f"| {who} | {k:.0f} | {s:.0f} |")
