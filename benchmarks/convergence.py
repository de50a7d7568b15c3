"""Convergence benchmark: total time and downtime against the workload's dirty rate, max-bandwidth 100 MB/s,
without help, with auto-converge and with dirty-limit; the advisor's prediction for each cell (asked just
before the migration, with the link probed) beside the outcome; a table, a plot (docs/convergence.png) and
a flight report of every cell (``mig report`` of the sources' records, docs/convergence-report.html)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mig_core.testing import Host, connect

RATES_MB = (10, 50, 100, 200, 500)
MODES = ("none", "auto-converge", "dirty-limit")
CUTOFF_S = 45.0
ENV = {"MIG_LOG_LEVEL": "warning"}


STRATEGY = {"none": "precopy", "auto-converge": "auto-converge", "dirty-limit": "dirty-limit"}


async def one(rate_mb: int, mode: str, records: Path) -> dict:
    env = dict(ENV, MIG_DIRTY_TRACKER="host") if mode == "dirty-limit" else ENV
    half = f"{rate_mb * 1_000_000 // 2}"
    wl = ("--ram", "128M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", f"{half},{half}")
    with tempfile.TemporaryDirectory() as tmp:
        s = Host(Path(tmp), *wl, "--flight-dir", str(records / f"{rate_mb}MBs-{mode}"), name="src", env=env)
        d = Host(Path(tmp), *wl, "--incoming", "defer", name="dst", env=env)
        try:
            src, dst = await connect(s.sock), await connect(d.sock)
            caps = [{"capability": c, "state": True} for c in ("return-path",) + ((mode,) if mode != "none" else ())]
            await src.execute("migrate-set-capabilities", {"capabilities": caps})
            await src.execute("migrate-set-parameters", {"max-bandwidth": 100_000_000, "vcpu-dirty-limit": 10})
            await dst.execute("migrate-incoming", {"uri": f"unix:{tmp}/m.sock"})
            advice = await src.execute("x-query-migration-advice", {"uri": f"unix:{tmp}/m.sock"})
            pred = next(p for p in advice["predictions"] if p["strategy"] == STRATEGY[mode])
            t0 = time.monotonic()
            await src.execute("migrate", {"uri": f"unix:{tmp}/m.sock"})
            rates = []
            while True:
                info = await src.execute("query-migrate")
                if info.get("ram", {}).get("dirty-pages-rate"):
                    rates.append(info["ram"]["dirty-pages-rate"] * 4096 / 1e6)
                if info["status"] in ("completed", "failed"):
                    break
                if time.monotonic() - t0 > CUTOFF_S:
                    await src.execute("migrate_cancel")
                    info = {"status": "did not converge", "passes": info["ram"]["dirty-sync-count"]}
                    break
                await asyncio.sleep(0.1)
            await src.disconnect()
            await dst.disconnect()
            return {"rate": rate_mb, "mode": mode, "status": info["status"], "total": info.get("total-time"),
                    "downtime": info.get("downtime"), "measured_dirty_mb": max(rates) if rates else 0.0,
                    "passes": info.get("ram", {}).get("dirty-sync-count", info.get("passes")),
                    "advised_dirty_mb": advice["dirty-rate"] / 1e6, "predicted": pred,
                    "recommended": advice["recommendation"]}
        finally:
            s.stop()
            d.stop()


def run(records: Path) -> list[dict]:
    return [asyncio.run(one(rate, mode, records)) for rate in RATES_MB for mode in MODES]


def prediction_cell(r: dict) -> tuple[str, str]:
    """The advisor's prediction for the cell's strategy, and how far the outcome was from it."""
    p = r["predicted"]
    if not p["converges"]:
        return "will not converge", "right" if r["status"] != "completed" else "**wrong**"
    if r["status"] != "completed":
        return f"{p['total-time']} ({p['passes']} passes)", "**wrong**"
    error = (p["total-time"] - r["total"]) * 100 / r["total"]
    return f"{p['total-time']} ({p['passes']} passes)", f"{error:+.1f} %"


def report(records: Path, html: Path) -> None:
    """``mig report`` of every cell's source record, beside the table."""
    paths = sorted(records.glob("*/*-source.jsonl"), key=lambda p: (int(p.parent.name.split("MBs")[0]),
                                                                   MODES.index(p.parent.name.split("MBs-")[1])))
    subprocess.run([sys.executable, "-m", "mig_core", "report", *map(str, paths), "-o", str(html), "--title",
                    "Convergence benchmark: flight records of every cell"], check=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, marker in zip(MODES, "osd", strict=True):
        pts = [r for r in rows if r["mode"] == mode and r["status"] == "completed"]
        a.plot([r["rate"] for r in pts], [r["total"] / 1000 for r in pts], marker=marker, label=mode)
        b.plot([r["rate"] for r in pts], [r["downtime"] for r in pts], marker=marker, label=mode)
        for r in rows:
            if r["mode"] == mode and r["status"] != "completed":
                a.scatter([r["rate"]], [CUTOFF_S], marker="x", color="red")
    a.set(xscale="log", xlabel="workload dirty rate (MB/s)", ylabel="total time (s)",
          title=f"128 MiB, max-bandwidth 100 MB/s (x: no convergence in {CUTOFF_S:.0f} s)")
    b.set(xscale="log", xlabel="workload dirty rate (MB/s)", ylabel="downtime (ms)", title="downtime-limit 300 ms")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(png: Path | None = None, html: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp)
        rows = run(records)
        if html is not None:
            report(records, html)
    print("### Convergence: 128 MiB, 2 vCPUs, max-bandwidth 100 MB/s, downtime-limit 300 ms (one run each)\n")
    print("| dirty rate (MB/s) | mode | result | total time (ms) | downtime (ms) | passes "
          "| peak measured dirty rate (MB/s) | advisor's dirty rate (MB/s) | predicted total time (ms) "
          "| prediction error | recommended |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        predicted, error = prediction_cell(r)
        print(f"| {r['rate']} | {r['mode']} | {r['status']} | {r['total'] or '-'} | {r['downtime'] or '-'} | "
              f"{r['passes']} | {r['measured_dirty_mb']:.0f} | {r['advised_dirty_mb']:.0f} | {predicted} | {error} "
              f"| {r['recommended']} |")
    if png is not None:
        plot(rows, png)
        print(f"\nplot: {png}")
    if html is not None:
        print(f"flight report: {html}")


if __name__ == "__main__":
    main(Path("docs/convergence.png"), Path("docs/convergence-report.html"))
