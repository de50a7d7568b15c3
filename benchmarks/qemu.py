"""mig beside QEMU 7.2 on the same box, the same RAM and the same QMP commands (``make bench WHICH=qemu``).

Both sources map the same 1 GiB file (random, text-like or a sparse file of zeros) and start paused
(``-S``); both destinations preallocate anonymous RAM. Runs alternate QEMU and mig; each row reports
``total-time`` and ``downtime`` from ``query-migrate`` and the CPU-seconds each side's process used
(``/proc/PID/stat``) from ``migrate`` to the destination's ``completed``. Beside them, measured in the
same run: raw loopback with the same number of connections and, with a compressor, the codec floor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from benchmarks.hosts import cpu_seconds, qmp_clients
from benchmarks.multifd import (
    CORES,
    ENV,
    GIB,
    UNPACED,
    codec_seconds_on_all_cores,
    codec_seconds_on_ram,
    raw_loopback_measured,
)
from mig_core.testing import Host, connect, migrate_and_wait, wait_for_status

#: (multifd channels (0: the main channel only), multifd-compression)
CONFIGS = [(0, "none"), (2, "none"), (4, "none"), (2, "zlib"), (2, "zstd"), (4, "zlib"), (4, "zstd")]
DATA = ("random", "text", "zero")
LEVEL = {"zlib": ("multifd-zlib-level", 1), "zstd": ("multifd-zstd-level", 1)}


def qemu_binary() -> tuple[str | None, str]:
    """``qemu-system-x86_64``, installed from the distribution if missing; (None, why) if it cannot be."""
    found = shutil.which("qemu-system-x86_64")
    if found:
        return found, ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "qemu-system-x86_64 is not installed and apt-get cannot install it here (needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "qemu-system-x86"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "qemu-system-x86"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if cmd[1] == "install" and done.returncode == 0:
            break
    found = shutil.which("qemu-system-x86_64")
    return (found, "") if found else (None, f"apt-get install qemu-system-x86 failed: {done.stderr.strip()[-300:]}")


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def ram_file(directory: Path, data: str, size: int = GIB) -> Path:
    """A file holding what ``mig run --ram-fill DATA`` writes (zero: a sparse file), for both sources to map."""
    from mig_core.machine.machine import Machine
    from mig_core.machine.reference_host import fill
    from mig_core.memory.ram import Backing

    path = directory / f"{data}.ram"
    with open(path, "wb") as f:
        f.truncate(size)
    if data != "zero":
        m = Machine()
        m.add_ram("pc.ram", size, backing=Backing.FILE, path=str(path))
        fill(m, data)
        m.blocks[0].close()
    return path


class QemuHost:
    """A ``qemu-system-x86_64`` q35 TCG machine started with ``-S``, QMP on a unix socket."""

    def __init__(self, binary: str, tmp: Path, name: str, ram: list[str], incoming: bool) -> None:
        self.sock = tmp / f"{name}.qmp"
        self.log = open(tmp / f"{name}.log", "w")
        self.sock.unlink(missing_ok=True)
        args = [binary, "-machine", "q35,accel=tcg,memory-backend=pc.ram", "-m", "1G", "-object", ",".join(ram),
                "-S", "-nodefaults", "-no-user-config", "-display", "none",
                "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    async def client(self) -> Any:
        for _ in range(600):
            if self.sock.exists():
                try:
                    return await connect(self.sock)
                except Exception:  # noqa: BLE001 - the socket exists before QEMU listens on it
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited with {self.proc.returncode}")
            await asyncio.sleep(0.05)
        raise RuntimeError("qemu did not open its QMP socket")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


async def _pair(src: Any, dst: Any, pids: tuple[int, int], channels: int, compression: str) -> dict:
    """Configure both sides alike, migrate over tcp loopback, return the source's figures and the CPU used."""
    caps = [{"capability": "multifd", "state": True}] if channels else []
    params: dict[str, Any] = {"max-bandwidth": 0, "downtime-limit": 300}
    if channels:
        params |= {"multifd-channels": channels, "multifd-compression": compression}
        if compression in LEVEL:
            params[LEVEL[compression][0]] = LEVEL[compression][1]
    for c in (src, dst):
        if caps:
            await c.execute("migrate-set-capabilities", {"capabilities": caps})
        await c.execute("migrate-set-parameters", params)
    await dst.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    cpu0 = cpu_seconds(pids[0]), cpu_seconds(pids[1])
    with src.listener("MIGRATION") as src_events, dst.listener("MIGRATION") as dst_events:
        info = await migrate_and_wait(src, {"uri": f"tcp:127.0.0.1:{port}"})
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"}, timeout=600)
        # both event clocks are the machine's wall clock: how long the destination took to be done (and, with
        # autostart, running) after the source was; the source's downtime does not show it
        lag = await _completed_at(dst_events) - await _completed_at(src_events)
    cpu = cpu_seconds(pids[0]) - cpu0[0], cpu_seconds(pids[1]) - cpu0[1]
    deadline = asyncio.get_running_loop().time() + 10
    while not info.get("total-time"):  # QEMU 7.2 shows completed before it has computed total-time (0 till then)
        assert asyncio.get_running_loop().time() < deadline, info
        await asyncio.sleep(0.01)
        info = await src.execute("query-migrate")
    return {"total_s": info["total-time"] / 1000, "downtime_ms": info.get("downtime", 0),
            "cpu_src": cpu[0], "cpu_dst": cpu[1], "dst_lag_ms": lag * 1000, "info": info}


async def _completed_at(events: Any) -> float:
    """The wall-clock time of the MIGRATION event that says completed (seconds)."""
    async def first() -> float:
        async for ev in events:
            if ev["data"]["status"] == "completed":
                return float(ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6)
        raise AssertionError("event stream ended before completed")
    return await asyncio.wait_for(first(), 60)


#: Wraps one migration, given the (source, destination) pids: e.g. a profiler attached to both
#: (``benchmarks.single``).
Profile = Callable[[tuple[int, int]], AbstractContextManager[object]]


async def run_qemu(binary: str, tmp: Path, ram: Path, channels: int, compression: str,
                   profile: Profile | None = None) -> dict:
    s = QemuHost(binary, tmp, "qsrc", ["memory-backend-file", "id=pc.ram", "size=1G", f"mem-path={ram}",
                                       "share=on"], incoming=False)
    d = QemuHost(binary, tmp, "qdst", ["memory-backend-ram", "id=pc.ram", "size=1G", "prealloc=on"], incoming=True)
    return await _measured(s, d, channels, compression, profile)


async def run_mig(tmp: Path, ram: Path, channels: int, compression: str, profile: Profile | None = None) -> dict:
    s = Host(tmp, "--ram", f"1G,backing=file,path={ram}", "-S", name="src", env=ENV)
    d = Host(tmp, "--ram", "1G", "--mem-prealloc", "-S", "--incoming", "defer", name="dst", env=ENV)
    return await _measured(s, d, channels, compression, profile)


async def _measured(s: QemuHost | Host, d: QemuHost | Host, channels: int, compression: str,
                    profile: Profile | None = None) -> dict:
    """One migration between two started hosts (QEMU's or mig's), which are stopped afterwards."""
    async with qmp_clients(s, d) as (src, dst):
        pids = (s.proc.pid, d.proc.pid)
        with profile(pids) if profile else nullcontext():
            return await _pair(src, dst, pids, channels, compression)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(binary: str, reps: int = 3, configs: list[tuple[int, str]] | None = None,
          data: tuple[str, ...] = DATA) -> list[dict]:
    """Every (data, channels, compressor) row: QEMU and mig alternating, with the same run's limits."""
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmpdir:
        tmp = Path(tmpdir)
        for fill in data:
            ram = ram_file(tmp, fill)
            for channels, comp in configs or CONFIGS:
                q, m, raw, floor, parallel = [], [], [], [], []
                for _ in range(reps):
                    conns = max(channels, 1)
                    raw.append(min(raw_loopback_measured(conns), raw_loopback_measured(conns, congestion=UNPACED)))
                    if comp != "none" and fill != "zero":
                        floor.append(sum(codec_seconds_on_ram(comp, LEVEL[comp][1], ram)) / CORES)
                        parallel.append(codec_seconds_on_all_cores(comp, LEVEL[comp][1], ram))
                    q.append(asyncio.run(run_qemu(binary, tmp, ram, channels, comp)))
                    m.append(asyncio.run(run_mig(tmp, ram, channels, comp)))
                # each repetition's limit against the mig run right after it: how far one run's ratio strays
                limits = floor if comp != "none" and floor else [r[0] for r in raw]
                ratios = sorted(lim / run["total_s"] for lim, run in zip(limits, m, strict=True))
                rows.append({"data": fill, "channels": channels, "compression": comp, "ratios": ratios,
                             "qemu_s": _median(q, "total_s"), "mig_s": _median(m, "total_s"),
                             "qemu_down": _median(q, "downtime_ms"), "mig_down": _median(m, "downtime_ms"),
                             "qemu_lag": _median(q, "dst_lag_ms"), "mig_lag": _median(m, "dst_lag_ms"),
                             "qemu_cpu_src": _median(q, "cpu_src"), "qemu_cpu_dst": _median(q, "cpu_dst"),
                             "mig_cpu_src": _median(m, "cpu_src"), "mig_cpu_dst": _median(m, "cpu_dst"),
                             "raw_s": statistics.median(r[0] for r in raw),
                             "raw_cpu": statistics.median(r[1] for r in raw),
                             "floor_s": statistics.median(floor) if floor else None,
                             "parallel_s": statistics.median(parallel) if parallel else None,
                             "mig_compression": m[-1]["info"].get("compression")})
                print(_line(rows[-1]), flush=True)
            ram.unlink()
    return rows


HEADER = ("| data | channels | compression | QEMU s | mig s | QEMU / mig | limit s | mig vs limit | downtime ms "
          "QEMU / mig | CPU s src QEMU / mig | CPU s dst QEMU / mig | CPU s both sides: mig / limit | "
          "codec on all cores s | mig vs it | dst done after src ms QEMU / mig |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _spread(ratios: list[float]) -> str:
    """`` (lowest–highest)`` of the repetitions' own limit / mig ratios (each repetition measures its limit
    right before its mig run), so a row's miss or pass can be told from the machine's run-to-run noise."""
    return f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""


def _line(r: dict) -> str:
    limit = r["floor_s"] if r["compression"] != "none" and r["floor_s"] else r["raw_s"]
    kind = "floor" if r["compression"] != "none" and r["floor_s"] else "raw"
    return (f"| {r['data']} | {r['channels'] or '1 (no multifd)'} | {r['compression']} | {r['qemu_s']:.2f} | "
            f"{r['mig_s']:.2f} | {r['qemu_s'] / r['mig_s']:.2f} | {limit:.2f} ({kind}) | {limit / r['mig_s']:.2f}"
            f"{_spread(r['ratios'])} | "
            f"{r['qemu_down']:.0f} / {r['mig_down']:.0f} | {r['qemu_cpu_src']:.2f} / {r['mig_cpu_src']:.2f} | "
            f"{r['qemu_cpu_dst']:.2f} / {r['mig_cpu_dst']:.2f} | {r['mig_cpu_src'] + r['mig_cpu_dst']:.2f} / "
            f"{limit * CORES if kind == 'floor' else r['raw_cpu']:.2f} | "
            + (f"{r['parallel_s']:.2f} | {r['parallel_s'] / r['mig_s']:.2f} |" if r.get("parallel_s") else "– | – |")
            + f" {r['qemu_lag']:.0f} / {r['mig_lag']:.0f} |")


def main(args: list[str] | None = None) -> None:
    binary, why = qemu_binary()
    if binary is None:
        print(f"### mig beside QEMU: skipped — {why}")
        return
    reps = int(os.environ.get("MIG_BENCH_REPS", "3"))
    print(f"### mig beside QEMU ({qemu_version(binary)}), 1 GiB, tcp loopback (median of {reps}, alternating)\n")
    print("Both sources map the same RAM file and start paused; destinations preallocate. Limit: raw loopback "
          "with the same connections (the faster congestion control), or with a compressor the codec floor "
          "(compress + decompress time of one thread each on the same data: the RAM file compressed in place from "
          "its mapping, as mig's channels compress RAM the dirty tracker shows unwritten, the packets "
          "decompressed into a preallocated GiB; over the cores). Mig vs limit: the limit's median over mig's, "
          "and in brackets the lowest and highest of the repetitions' own ratios (each repetition measures its "
          "limit right before its mig run): how far one run strays on this machine. CPU s both sides: "
          "the CPU-seconds mig's two processes used against those the limit's copying threads used (raw) or "
          "the codec's two threads (floor); on these cores a run cannot take less than its CPU-seconds over "
          "the cores. Codec on all cores: the floor's work done by one thread per core at once (each its share "
          "compressed, then each its share decompressed), nothing else running: what the cores give when they "
          "all run the codec, as a migration's channels do. Dst done after src: how long after the source's "
          "MIGRATION completed event the destination's came (both stamped with the machine's wall clock); a "
          "guest waits that long on top of the source's downtime.\n")
    print(HEADER, flush=True)
    only = set(args or [])
    table(binary, reps, data=tuple(d for d in DATA if not only or d in only))


if __name__ == "__main__":
    os.environ.update(ENV)
    main(sys.argv[1:])
