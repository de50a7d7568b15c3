"""One row of ``make bench WHICH=qemu``, one migration at a time: for A/B runs of two checkouts and for
profiles of both processes while they migrate.

``python -m benchmarks.single DATA CHANNELS COMPRESSION [--reps N] [--qemu] [--perf FILE] [--keep]``
(DATA: random, text or zero; CHANNELS 0: the main channel only). Each repetition prints total-time,
downtime and the CPU-seconds of each side; ``--qemu`` runs QEMU 7.2 after each mig run, as the table
alternates them. Run it from the checkout to measure: the hosts import mig_core from the working directory.
``--perf FILE`` records both processes with ``perf record -g`` from just before ``migrate`` to the
destination's ``completed``; ``perf report -i FILE --sort pid,tid,sym`` splits the time by thread.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks import qemu
from benchmarks.multifd import ENV


@contextmanager
def perf_record(path: str, pids: tuple[int, int]) -> Iterator[None]:
    """``perf record -g`` of both processes while the block runs (it needs a moment to attach first)."""
    proc = subprocess.Popen(["perf", "record", "-g", "-F", "4999", "-o", path, "-p", f"{pids[0]},{pids[1]}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def _line(who: str, r: dict) -> str:
    setup = r["info"].get("setup-time", "-")
    return (f"{who} total {r['total_s']:.3f} s  setup {setup} ms  downtime {r['downtime_ms']} ms  "
            f"cpu src {r['cpu_src']:.2f} s dst {r['cpu_dst']:.2f} s  dst done +{r['dst_lag_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.single",
                                 description="One row of make bench WHICH=qemu, one migration at a time.")
    ap.add_argument("data", choices=qemu.DATA)
    ap.add_argument("channels", type=int, help="multifd channels (0: the main channel only)")
    ap.add_argument("compression", choices=("none", *qemu.LEVEL))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--qemu", action="store_true", help="run QEMU after each mig run (installed if missing)")
    ap.add_argument("--perf", metavar="FILE", help="perf record both of mig's processes (FILE.N per repetition)")
    ap.add_argument("--keep", action="store_true", help="keep the RAM file and the hosts' logs (printed)")
    args = ap.parse_args(argv)
    if args.compression != "none" and not args.channels:
        ap.error("a compressor needs multifd channels")
    binary = None
    if args.qemu:
        binary, why = qemu.qemu_binary()
        if binary is None:
            ap.error(why)
    os.environ.update(ENV)
    tmp = Path(tempfile.mkdtemp(prefix="mig-single-"))
    try:
        ram = qemu.ram_file(tmp, args.data)
        for rep in range(args.reps):
            profile = None
            if args.perf:
                out = f"{args.perf}.{rep}" if args.reps > 1 else args.perf
                profile = lambda pids, out=out: perf_record(out, pids)  # noqa: E731 - one per repetition
            print(_line("mig ", asyncio.run(qemu.run_mig(tmp, ram, args.channels, args.compression, profile))),
                  flush=True)
            if binary:
                print(_line("qemu", asyncio.run(qemu.run_qemu(binary, tmp, ram, args.channels, args.compression))),
                      flush=True)
    finally:
        if args.keep:
            print(f"kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
