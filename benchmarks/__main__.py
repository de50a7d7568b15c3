"""Run every benchmark and print the results as Markdown (``make bench``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks import block, checksums, colo, convergence, machine, migration, multifd, postcopy, qemu, snapshot, tls
from mig_core.logconfig import configure_logging


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    configure_logging(level=os.environ.get("MIG_LOG_LEVEL", "warning"))
    which = sys.argv[1:] or ["machine", "migration", "convergence", "multifd", "postcopy", "snapshot", "block",
                             "tls", "checksums", "colo", "qemu"]
    print(f"machine: {_cpu()}\n")
    if "machine" in which:
        data_path()
    if "migration" in which:
        migration.main()
    if "multifd" in which:
        multifd.main()
    if "postcopy" in which:
        postcopy.main()
    if "snapshot" in which:
        snapshot.main()
    if "block" in which:
        block.main()
    if "tls" in which:
        tls.main()
    if "checksums" in which:
        checksums.main()
    if "colo" in which:
        colo.main()
    if "qemu" in which:
        qemu.main()
    if "convergence" in which:
        docs = Path(__file__).resolve().parent.parent / "docs"
        convergence.main(docs / "convergence.png", docs / "convergence-report.html")


def data_path() -> None:
    print("### Dirty trackers: one collect() per GiB (ms, median of 5)\n")
    print("| tracker | 0 % | 1 % | 10 % | 100 % |\n|---|---|---|---|---|")
    for r in machine.trackers():
        print(f"| {r['tracker']} | {r['0%']:.1f} | {r['1%']:.1f} | {r['10%']:.1f} | {r['100%']:.1f} |")
    w = machine.uffd_write_cost()
    print("\n### Writer cost of uffd-wp tracking (1 GiB)\n")
    print("| | one u64 per page (µs/page) | full memset (GiB/s) |\n|---|---|---|")
    for k in ("untracked", "tracked"):
        print(f"| {k} | {w[k]['us_per_page']:.3f} | {w[k]['memset_gib_s']:.2f} |")
    print("\n### Page batches: encode and decode against memcpy, same run (GiB/s, median of 7)\n")
    print("| pattern | MiB | encode | decode | memcpy |\n|---|---|---|---|---|")
    for r in machine.page_batches():
        print(f"| {r['pattern']} | {r['MiB']} | {r['encode_gib_s']:.2f} | {r['decode_gib_s']:.2f} | "
              f"{r['memcpy_gib_s']:.2f} |")
    s = machine.vcpu_stop_latency()
    print(f"\n### vCPU stop latency ({s['vcpus']} busy vCPU threads, 50 stops)\n")
    print(f"median {s['median_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, max {s['max_ms']:.3f} ms")
    p = machine.populated_scan()
    print("\n### Populated-page scan of a never-touched 1 GiB block (ms, median of 9)\n")
    print(f"memfd (SEEK_DATA): {p['memfd']:.3f} ms; anonymous (PAGEMAP_SCAN): {p['anonymous']:.3f} ms")


if __name__ == "__main__":
    main()
