"""Multifd, compressors, xbzrle and mapped-ram files, each against a limit measured in the same run."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mig_transport_socket import UNPACED_CONGESTION_CONTROLS

from benchmarks.hosts import migrate_measured, qmp_clients
from mig_core.testing import Host, migrate_and_wait, wait_for_status

GIB = 1 << 30
ENV = {"MIG_LOG_LEVEL": "info"}
CORES = os.cpu_count() or 1

_RAW_RECEIVER = r"""
import os, socket, sys, threading, time, numpy as np
size, n, pin = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
buf = np.ones(size, dtype=np.uint8)  # faulted in, like a preallocated destination
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(n)
print(s.getsockname()[1], flush=True)
conns = [s.accept()[0] for _ in range(n)]
index = [c.recv(1)[0] for c in conns]  # which slice each connection carries (accept order may differ)
cores = sorted(os.sched_getaffinity(0))
part = size // n
cpu = [0.0] * n
def rx(j):
    i = index[j]
    if pin:  # beside its sender
        os.sched_setaffinity(0, {cores[i % len(cores)]})  # this thread only (Linux)
    start = time.thread_time()
    mv = memoryview(buf)[i * part:(i + 1) * part]; got = 0
    while got < part:
        k = conns[j].recv_into(mv[got:])
        if not k: break
        got += k
    cpu[j] = time.thread_time() - start
ts = [threading.Thread(target=rx, args=(j,)) for j in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sum(cpu), flush=True)
conns[0].sendall(b"k")
"""


def raw_loopback(n: int = 1, size: int = GIB, congestion: bytes | None = None, pinned: bool = False) -> float:
    """Seconds to move ``size`` random bytes over ``n`` loopback connections (``raw_loopback_measured``)."""
    return raw_loopback_measured(n, size, congestion, pinned)[0]


def raw_loopback_measured(n: int = 1, size: int = GIB, congestion: bytes | None = None,
                          pinned: bool = False) -> tuple[float, float]:
    """Seconds to move ``size`` random bytes over ``n`` loopback connections (a thread per connection on each
    side, sendall of 4 MiB slices / recv_into a faulted-in buffer): the limit for n multifd channels; and
    the CPU-seconds those threads used on both sides together (what the move costs the machine's cores).

    ``congestion``: the senders' congestion control (None: the system's default). Every connection gets
    TCP_NODELAY, as mig's do. ``pinned``: connection i's sender and receiver both run on core i mod cores,
    so the receiver copies what its sender just wrote from that core's cache. With at least as many
    connections as cores that is the best placement (issue 21: 2 connections on 2 cores took 0.16 s
    side by side, 0.27 s crosswise); unpinned, the scheduler places the threads and a run's time depends
    on where. With fewer connections than cores it keeps cores idle: not a limit then."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    rx = subprocess.Popen([sys.executable, "-c", _RAW_RECEIVER, str(size), str(n), "1" if pinned else "0"],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    port = int(rx.stdout.readline())
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for i, s in enumerate(socks):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as mig's socket transport sets it
        if congestion:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion)
        s.sendall(bytes([i]))
    part = size // n
    cpu = [0.0] * n
    cores = sorted(os.sched_getaffinity(0))

    def tx(i: int) -> None:
        if pinned:
            os.sched_setaffinity(0, {cores[i % len(cores)]})  # this thread only (Linux)
        start = time.thread_time()
        mv = memoryview(data)[i * part:(i + 1) * part]
        for off in range(0, part, 4 << 20):
            socks[i].sendall(mv[off:off + (4 << 20)])
        cpu[i] = time.thread_time() - start

    t = time.perf_counter()
    threads = [threading.Thread(target=tx, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    socks[0].recv(1)
    elapsed = time.perf_counter() - t
    rx_cpu = float(rx.stdout.readline())
    for s in socks:
        s.close()
    rx.wait()
    return elapsed, sum(cpu) + rx_cpu


#: what mig's socket transport switches a loopback connection to, where it can (its first choice)
UNPACED = UNPACED_CONGESTION_CONTROLS[0]


def system_congestion() -> str:
    """The system's default TCP congestion control (BBR paces every send with timers)."""
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def sample(fill: str, size: int = 64 << 20) -> np.ndarray:
    """The bytes ``mig run --ram-fill`` puts in RAM, for measuring a compressor on the same data."""
    from mig_core.machine.machine import Machine
    from mig_core.machine.reference_host import fill as do_fill

    m = Machine()
    m.add_ram("pc.ram", size)
    do_fill(m, fill)
    return m.blocks[0].array.copy()


def codec_speeds(name: str, level: int, data: np.ndarray) -> tuple[float, float]:
    """Bytes of ``data`` per second one thread compresses (the plugin's encoder, 4 MiB packets, each
    dropped before the next as a channel sends it) and decompresses (its decoder, the same packets in
    order, into memory as the destination decodes into RAM). A first untimed round warms the allocator.
    Nothing writes ``data``, so it is compressed in place (``compress_parts_stable``), as a channel compresses
    RAM that the dirty tracker shows unwritten."""
    from mig_core.plugin.registry import PluginRegistry

    comp = PluginRegistry.from_environment().load("mig_core.compressors", name)()
    mv = memoryview(data)
    offsets = range(0, len(data), 4 << 20)
    sizes = [min(4 << 20, len(data) - off) for off in offsets]
    timings = []
    for _ in range(2):  # fresh encoders and decoder each round: the second round is the one timed
        enc = comp.encoder(level)
        t = time.perf_counter()
        for off, size in zip(offsets, sizes, strict=True):
            enc.compress_parts_stable(mv[off:off + size])  # as a channel calls it: each packet dropped once sent
        t_c = time.perf_counter() - t
        enc, dec = comp.encoder(level), comp.decoder()  # the same packets again, kept for the decoder
        packets = [b"".join(enc.compress_parts_stable(mv[off:off + size]))
                   for off, size in zip(offsets, sizes, strict=True)]
        out = np.ones(max(sizes), dtype=np.uint8)  # faulted in, as the destination's RAM
        t = time.perf_counter()
        for packet, size in zip(packets, sizes, strict=True):
            dec.decompress_into(packet, memoryview(out)[:size])  # as the destination decodes: into RAM
        timings.append((t_c, time.perf_counter() - t))
    t_c, t_d = timings[-1]
    return len(data) / t_c, len(data) / t_d


def codec_seconds_on_ram(name: str, level: int, ram: Path) -> tuple[float, float]:
    """Seconds one thread takes to compress the RAM file ``ram`` (mapped read-only, as a source reads it, in
    4 MiB packets) and to decompress those packets, in order, into as much preallocated memory (as a
    destination decodes into its RAM): the codec's part of the job itself, with its data coming from and
    going to memory. Nothing writes the file, so the encoder reads it in place (``compress_parts_stable``):
    the floor gets the advantage mig's channels take where the dirty tracker shows RAM unwritten, and a limit
    is never given less than mig takes. (``codec_speeds`` measures the codec on a sample that stays in the
    caches and decodes into one reused buffer: 25-40 % quicker than the same codec doing the migration's
    work, issue 21.)"""
    return _codec_seconds(name, level, ram, 1)


def codec_seconds_on_all_cores(name: str, level: int, ram: Path, cores: int = CORES) -> float:
    """Seconds the same work takes spread over ``cores`` threads at once, nothing else running: each thread
    compresses its share of the packets, then each decompresses its share (the two phases added).

    ``codec_seconds_on_ram``'s floor assumes the codec runs as fast on every core at once as on one. This
    measures what these cores give when they all run it, sharing caches and memory bandwidth, as a
    migration's channels do (issue 21: 5-35 % over the floor on 2 cores, text-like zstd)."""
    return sum(_codec_seconds(name, level, ram, cores))


def _codec_seconds(name: str, level: int, ram: Path, threads: int) -> tuple[float, float]:
    """(compress, decompress) seconds of ``ram``'s 4 MiB packets over ``threads`` threads (packets dealt out
    in turn), each phase the longest any thread spent inside the codec's calls: copying a packet's output
    aside for the decoder is not the codec's work and stays outside the timing."""
    import mmap

    from mig_core.plugin.registry import PluginRegistry

    comp = PluginRegistry.from_environment().load("mig_core.compressors", name)()
    step = 4 << 20
    with open(ram, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    shares = [range(i * step, size, threads * step) for i in range(threads)]
    packets: dict[int, bytes] = {}
    out = np.ones(size, dtype=np.uint8)  # faulted in, as a preallocated destination's RAM
    spent = [0.0] * threads

    def compress(i: int) -> None:
        enc, mv = comp.encoder(level), memoryview(mapped)
        try:
            for off in shares[i]:
                t = time.perf_counter()
                parts = enc.compress_parts_stable(mv[off:off + step])
                spent[i] += time.perf_counter() - t
                packets[off] = b"".join(parts)  # the parts may be the encoder's buffer, reused by its next call
        finally:
            mv.release()

    def decompress(i: int) -> None:
        dec = comp.decoder()
        for off in shares[i]:
            t = time.perf_counter()
            dec.decompress_into(packets[off], memoryview(out)[off:off + step])
            spent[i] += time.perf_counter() - t

    def phase(work: Callable[[int], None]) -> float:
        spent[:] = [0.0] * threads
        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        return max(spent)

    try:
        return phase(compress), phase(decompress)
    finally:
        mapped.close()


async def _migrate(tmp: Path, fill: str, channels: int, compression: str, extra: tuple[str, ...] = (),
                   caps: tuple[str, ...] = (), params: dict | None = None, ram: str = "1G") -> dict:
    src_args = ("--ram", ram, "--ram-fill", fill, *extra)
    s = Host(tmp, *src_args, name="src", env=ENV)
    workload = tuple(a for a in extra if a != "--mem-prealloc")  # the device checks both run the same workload
    d = Host(tmp, "--ram", ram, "--mem-prealloc", *workload, "-S", "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(s, d) as (src, dst):
        on = [c for c in (("multifd",) if channels else ()) + ("return-path",) + caps]
        p = {"max-bandwidth": 0, **(params or {})}
        if channels:
            p |= {"multifd-channels": channels, "multifd-compression": compression}
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": x, "state": True}
                                                                          for x in on]})
            await c.execute("migrate-set-parameters", p)
        info, cpu_src, cpu_dst = await migrate_measured(src, dst, s, d)
    return {"info": info, "cpu_src": cpu_src, "cpu_dst": cpu_dst}


def _run(*args, **kw) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(_migrate(Path(tmp), *args, **kw))


def channels_table(reps: int = 5) -> list[dict]:
    """No compression: 1, 2, 4 channels × random, text, zero data; raw loopback with the same connections."""
    rows = []
    for n in (1, 2, 4):
        raw: list[float] = []
        raw_unpaced: list[float] = []
        raw_pinned: list[float] = []
        got: dict[str, list[dict]] = {"random": [], "text": [], "zero": []}
        for _ in range(reps):  # interleaved: limit and migrations alternate
            raw.append(raw_loopback(n))
            raw_unpaced.append(raw_loopback(n, congestion=UNPACED))
            if n >= CORES:
                raw_pinned.append(raw_loopback(n, congestion=UNPACED, pinned=True))
            for fill in got:
                extra = ("--mem-prealloc",) if fill == "zero" else ()
                got[fill].append(_run(fill, n, "none", extra))
        for fill, runs in got.items():
            t = statistics.median(r["info"]["total-time"] for r in runs) / 1000
            rows.append({"channels": n, "data": fill, "compressor": "none", "mig_s": t,
                         "raw_s": statistics.median(raw), "raw_unpaced_s": statistics.median(raw_unpaced),
                         "raw_pinned_s": statistics.median(raw_pinned) if raw_pinned else None,
                         "cpu_src": statistics.median(r["cpu_src"] for r in runs),
                         "cpu_dst": statistics.median(r["cpu_dst"] for r in runs), "ratio": 1.0})
    return rows


COMPRESSORS = [("zlib", "multifd-zlib-level", 1), ("zstd", "multifd-zstd-level", 1), ("qpl", None, 1),
               ("uadk", None, 1)]


def compressor_table(reps: int = 3) -> list[dict]:
    """Each compressor, 2 channels, text-like and random data; limit = its single-thread speed × min(2, cores)."""
    rows = []
    for fill in ("text", "random"):
        data = sample(fill)
        for name, param, level in COMPRESSORS:
            speeds, dspeeds, runs = [], [], []
            for _ in range(reps):
                c_speed, d_speed = codec_speeds(name, level, data)
                speeds.append(c_speed)
                dspeeds.append(d_speed)
                runs.append(_run(fill, 2, name, params={param: level} if param else {}))
            comp = [r["info"]["compression"] for r in runs]
            ratio = statistics.median(c["pages"] * 4096 / c["compressed-size"] for c in comp)
            rows.append({"channels": 2, "data": fill, "compressor": name,
                         "mig_s": statistics.median(r["info"]["total-time"] for r in runs) / 1000,
                         "limit_s": GIB / (statistics.median(speeds) * min(2, CORES)),
                         "single_mib_s": statistics.median(speeds) / (1 << 20), "ratio": ratio,
                         "decompress_mib_s": statistics.median(dspeeds) / (1 << 20),
                         # source and destination share these cores: compressing and decompressing 1 GiB
                         # cannot take less than their single-thread times over the cores
                         "floor_s": (GIB / statistics.median(speeds) + GIB / statistics.median(dspeeds)) / CORES,
                         "cpu_src": statistics.median(r["cpu_src"] for r in runs),
                         "cpu_dst": statistics.median(r["cpu_dst"] for r in runs)})
    return rows


def xbzrle_saving(reps: int = 3) -> dict:
    """A workload rewriting 8 bytes per page (128 MiB, 2 vCPUs at 32 MiB/s, max-bandwidth 48 MiB/s): bytes
    on the wire with and without xbzrle, and what xbzrle reports."""
    wl = ("--vcpus", "2", "--dirty-rate", "32M")
    params = {"max-bandwidth": 48 << 20, "downtime-limit": 30}
    out = []
    for _ in range(reps):
        plain = _run("random", 0, "none", wl, params=params, ram="128M")["info"]
        r = _run("random", 0, "none", wl, caps=("xbzrle",), params={**params, "xbzrle-cache-size": 128 << 20},
                 ram="128M")["info"]
        x = r["xbzrle-cache"]
        out.append({"pages": x["pages"], "bytes": x["bytes"], "saved": x["pages"] * 4096 - x["bytes"],
                    "with": r["ram"]["transferred"], "without": plain["ram"]["transferred"],
                    "passes_with": r["ram"]["dirty-sync-count"], "passes_without": plain["ram"]["dirty-sync-count"],
                    "cache_miss_rate": x["cache-miss-rate"], "encoding_rate": x["encoding-rate"],
                    "overflow": x["overflow"]})
    return {k: statistics.median(o[k] for o in out) for k in out[0]}


async def _file_round_trip(tmp: Path, channels: int) -> dict:
    image = tmp / "vm.img"
    s = Host(tmp, "--ram", "1G", "--ram-fill", "random", name="src", env=ENV)
    caps = ["mapped-ram"] + (["multifd"] if channels else [])
    async with qmp_clients(s) as (src,):
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": c, "state": True}
                                                                        for c in caps]})
        await src.execute("stop")  # QEMU's advice for mapped-ram: save a stopped machine
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0, **({"multifd-channels": channels}
                                                                             if channels else {})})
        info = await migrate_and_wait(src, {"uri": f"file:{image}"})
        assert info["status"] == "completed", info
        save_s = info["total-time"] / 1000
    d = Host(tmp, "--ram", "1G", "--mem-prealloc", "-S", "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(d) as (dst,):
        await dst.execute("migrate-set-capabilities", {"capabilities": [{"capability": c, "state": True}
                                                                        for c in caps]})
        if channels:
            await dst.execute("migrate-set-parameters", {"multifd-channels": channels})
        t = time.perf_counter()
        await dst.execute("migrate-incoming", {"uri": f"file:{image}"})
        await wait_for_status(dst, {"completed"}, timeout=600)
        restore_s = time.perf_counter() - t
    return {"save_s": save_s, "restore_s": restore_s}


def plain_file_io(tmp: Path, size: int = GIB) -> tuple[float, float]:
    """Write (with fsync, as mig's save ends) and read back ``size`` random bytes in 4 MiB chunks."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp / "plain.img"
    t = time.perf_counter()
    with open(path, "wb") as f:
        mv = memoryview(data)
        for off in range(0, size, 4 << 20):
            f.write(mv[off:off + (4 << 20)])
        f.flush()
        os.fsync(f.fileno())
    w = time.perf_counter() - t
    buf = np.ones(size, dtype=np.uint8)
    t = time.perf_counter()
    with open(path, "rb") as f:
        f.readinto(memoryview(buf))
    r = time.perf_counter() - t
    path.unlink()
    return w, r


def file_table(reps: int = 3) -> list[dict]:
    rows = []
    for channels in (0, 2):
        got, plain = [], []
        for _ in range(reps):
            with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as tmp:
                plain.append(plain_file_io(Path(tmp)))
                got.append(asyncio.run(_file_round_trip(Path(tmp), channels)))
        rows.append({"channels": channels, "save_s": statistics.median(g["save_s"] for g in got),
                     "restore_s": statistics.median(g["restore_s"] for g in got),
                     "write_s": statistics.median(p[0] for p in plain),
                     "read_s": statistics.median(p[1] for p in plain)})
    return rows


def main(which: set[str] | None = None) -> None:
    which = which or {"channels", "compressors", "xbzrle", "file"}
    if "channels" in which:
        print("### Multifd without compression, 1 GiB, tcp loopback (median of 5, interleaved with the limit)\n")
        print(f"Limit: raw loopback with the same number of connections (a thread per connection on each side), "
              f"with the system's congestion control ({system_congestion()}) and with "
              f"{UNPACED.decode()} (what mig's loopback connections use); mig / raw is against the faster. "
              f"Pinned (at least as many connections as cores): {UNPACED.decode()}, each connection's two "
              "threads on one core, the placement the scheduler finds only in some runs (mig does not pin).\n")
        print("| channels | data | mig s | GiB/s | raw s (system) | raw s (unpaced) | GiB/s (faster) | mig / raw "
              "| raw s (pinned) | mig / pinned | CPU s src | CPU s dst |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in channels_table():
            best = min(r["raw_s"], r["raw_unpaced_s"])
            pinned = (f"{r['raw_pinned_s']:.3f} | {r['raw_pinned_s'] / r['mig_s']:.2f}" if r["raw_pinned_s"]
                      else "– | –")
            print(f"| {r['channels']} | {r['data']} | {r['mig_s']:.3f} | {1 / r['mig_s']:.2f} | {r['raw_s']:.3f} | "
                  f"{r['raw_unpaced_s']:.3f} | {1 / best:.2f} | {best / r['mig_s']:.2f} | {pinned} | "
                  f"{r['cpu_src']:.2f} | {r['cpu_dst']:.2f} |")
    if "compressors" in which:
        print("\n### Compressors, 2 multifd channels, 1 GiB (median of 3, interleaved with the limit)\n")
        print(f"Limit: the compressor's own single-thread speed on the same data × min(channels, cores) "
              f"= × {min(2, CORES)}. Floor: both ends share these {CORES} cores, so compressing and decompressing "
              "1 GiB takes at least (compress time + decompress time, one thread each) / cores; "
              "limit / floor is the best mig / limit this machine allows.\n")
        print("| compressor | data | ratio | mig s | MiB/s | compress MiB/s (1 thread) | decompress MiB/s (1 thread) "
              "| limit s | floor s | mig / limit | best possible (limit / floor) | CPU s src | CPU s dst |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in compressor_table():
            print(f"| {r['compressor']} | {r['data']} | {r['ratio']:.1f} | {r['mig_s']:.2f} | "
                  f"{1024 / r['mig_s']:.0f} | {r['single_mib_s']:.0f} | {r['decompress_mib_s']:.0f} | "
                  f"{r['limit_s']:.2f} | {r['floor_s']:.2f} | {r['limit_s'] / r['mig_s']:.2f} | "
                  f"{min(1.0, r['limit_s'] / r['floor_s']):.2f} | {r['cpu_src']:.2f} | {r['cpu_dst']:.2f} |")
    if "xbzrle" in which:
        x = xbzrle_saving()
        print("\n### xbzrle on a small-change workload (128 MiB random, 2 vCPUs rewriting 8 bytes per page at "
              "32 MiB/s, max-bandwidth 48 MiB/s, downtime-limit 30 ms; median of 3)\n")
        print("| | transferred bytes | passes |\n|---|---|---|")
        print(f"| without xbzrle | {x['without']:.0f} | {x['passes_without']:.0f} |")
        print(f"| with xbzrle | {x['with']:.0f} | {x['passes_with']:.0f} |")
        print(f"\nxbzrle encoded {x['pages']:.0f} pages into {x['bytes']:.0f} bytes (saved {x['saved']:.0f} bytes, "
              f"encoding-rate {x['encoding_rate']:.1f}, overflow {x['overflow']:.0f}, last cache-miss-rate "
              f"{x['cache_miss_rate']:.3f}).")
    if "file" in which:
        print("\n### mapped-ram file save and restore, 1 GiB random, machine stopped (median of 3)\n")
        print("Limit: plain file write (4 MiB writes + fsync) and read (one readinto) of 1 GiB on the same "
              "file system, same run.\n")
        print("| channels | save s | write s | save / write | restore s | read s | restore / read |")
        print("|---|---|---|---|---|---|---|")
        for r in file_table():
            print(f"| {r['channels'] or 'none (no multifd)'} | {r['save_s']:.2f} | {r['write_s']:.2f} | "
                  f"{r['write_s'] / r['save_s']:.2f} | {r['restore_s']:.2f} | {r['read_s']:.2f} | "
                  f"{r['read_s'] / r['restore_s']:.2f} |")


if __name__ == "__main__":
    os.environ.update(ENV)
    main(set(sys.argv[1:]) or None)
