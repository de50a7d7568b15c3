"""What x-checksums costs: 1 GiB random RAM migrated with and without it, one channel and multifd 4, the CPU
each side spends per GiB, beside raw loopback measured in the same run. ``make bench WHICH=checksums``."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

from benchmarks.hosts import configure_both, migrate_measured, qmp_clients
from benchmarks.multifd import UNPACED, raw_loopback
from mig_core.testing import Host

ENV = {"MIG_LOG_LEVEL": "warning"}


async def _migrate(tmp: Path, checksums: bool, channels: int) -> dict:
    s = Host(tmp, "--ram", "1G", "--ram-fill", "random", name="src", env=ENV)
    d = Host(tmp, "--ram", "1G", "--mem-prealloc", "-S", "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(s, d) as (src, dst):
        caps = ["return-path"] + (["multifd"] if channels else []) + (["x-checksums"] if checksums else [])
        await configure_both([src, dst], caps, {"max-bandwidth": 0, **({"multifd-channels": channels}
                                                                      if channels else {})})
        info, cpu_src, cpu_dst = await migrate_measured(src, dst, s, d)
    return {"s": info["total-time"] / 1000, "cpu_src": cpu_src, "cpu_dst": cpu_dst}


def main(reps: int = 3) -> None:
    configs = [(0, False), (0, True), (4, False), (4, True)]
    runs: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
    raw = []
    for _ in range(reps):
        raw.append(raw_loopback(1, congestion=UNPACED))
        for channels, checksums in configs:
            with tempfile.TemporaryDirectory() as tmp:
                runs[(channels, checksums)].append(asyncio.run(_migrate(Path(tmp), checksums, channels)))
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"### x-checksums against none, 1 GiB random, tcp loopback (median of {reps}, interleaved)\n")
    print(f"Limit, same run: raw loopback, one connection ({UNPACED.decode()}): {statistics.median(raw):.3f} s.\n")
    print("| channels | x-checksums | s | × without | CPU s/GiB src | CPU s/GiB dst |")
    print("|---|---|---|---|---|---|")
    for (channels, checksums), rs in runs.items():
        base = med(runs[(channels, False)], "s")
        print(f"| {channels or '1 (no multifd)'} | {'on' if checksums else 'off'} | {med(rs, 's'):.3f} | "
              f"{base / med(rs, 's'):.2f} | {med(rs, 'cpu_src'):.2f} | {med(rs, 'cpu_dst'):.2f} |")
    print()
