"""TLS against plain migration, 1 GiB random RAM, in one run: one channel and multifd 4, with the CPU each side
spends per GiB, beside raw loopback and raw TLS loopback (Python's ssl over one connection) measured the same run.
Two more rows: one channel with ``postcopy-ram`` on both sides (no switch), plain and TLS. With it the
destination drops its RAM at the advise (every page then faults in again), and its TLS session ends in the
relay process, a child of the destination whose CPU its column includes (``benchmarks.hosts.cpu_seconds``
counts a host's whole process tree).

``make bench WHICH=tls``.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mig_tls.testing import make_pki

from benchmarks.hosts import configure_both, migrate_measured, qmp_clients
from benchmarks.multifd import GIB, UNPACED, raw_loopback
from mig_core.testing import Host

ENV = {"MIG_LOG_LEVEL": "warning"}

_TLS_RECEIVER = r"""
import socket, ssl, sys, numpy as np
size, pki = int(sys.argv[1]), sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(pki + "/server-cert.pem", pki + "/server-key.pem")
buf = np.ones(size, dtype=np.uint8)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c = ctx.wrap_socket(s.accept()[0], server_side=True)
mv = memoryview(buf); got = 0
while got < size:
    k = c.recv_into(mv[got:], min(size - got, 1 << 20))
    if not k: break
    got += k
c.sendall(b"k")
"""


_TLS_SENDER = r"""
import socket, ssl, sys, time, numpy as np
port, size, pki, congestion = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
data = np.random.default_rng(port).integers(0, 256, size, dtype=np.uint8)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(pki + "/ca-cert.pem")
raw = socket.create_connection(("127.0.0.1", port))
raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion)  # as mig's transport sets them
raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
print("ready", flush=True)
sys.stdin.readline()
mv = memoryview(data)
for off in range(0, size, 4 << 20):
    s.sendall(mv[off:off + (4 << 20)])
s.recv(1)
print(time.time(), flush=True)
"""


def raw_tls_loopback(pki: Path, size: int = GIB, connections: int = 1) -> float:
    """Seconds to move ``size`` random bytes through ``connections`` TLS 1.3 connections on loopback (each
    a sending and a receiving process, Python's ssl on a socket at each end, the sender with the congestion
    control and TCP_NODELAY mig's transport sets): TLS's own limit with Python's ssl on this machine."""
    part = size // connections
    receivers = [subprocess.Popen([sys.executable, "-c", _TLS_RECEIVER, str(part), str(pki)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(connections)]
    senders = []
    for rx in receivers:
        assert rx.stdout is not None
        port = int(rx.stdout.readline())
        senders.append(subprocess.Popen([sys.executable, "-c", _TLS_SENDER, str(port), str(part), str(pki),
                                         UNPACED.decode()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True))
    for tx in senders:
        assert tx.stdout is not None
        assert tx.stdout.readline().strip() == "ready"
    start = time.time()
    for tx in senders:
        assert tx.stdin is not None
        tx.stdin.write("go\n")
        tx.stdin.flush()
    ends = []
    for tx in senders:
        assert tx.stdout is not None
        ends.append(float(tx.stdout.readline()))
        tx.wait()
    for rx in receivers:
        rx.wait()
    return max(ends) - start


async def _migrate(tmp: Path, pki: Path, tls: bool, channels: int, postcopy: bool) -> dict:
    obj = lambda end: (f"--object=tls-creds-x509,id=tls0,dir={pki},endpoint={end}",  # noqa: E731
                       "--param", "tls-creds=tls0") if tls else ()
    s = Host(tmp, "--ram", "1G", "--ram-fill", "random", *obj("client"), name="src", env=ENV)
    d = Host(tmp, "--ram", "1G", "--mem-prealloc", *obj("server"), "-S", "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(s, d) as (src, dst):
        caps = ["return-path"] + (["multifd"] if channels else []) + (["postcopy-ram"] if postcopy else [])
        await configure_both([src, dst], caps, {"max-bandwidth": 0, **({"multifd-channels": channels}
                                                                      if channels else {})})
        info, cpu_src, cpu_dst = await migrate_measured(src, dst, s, d)
    return {"s": info["total-time"] / 1000, "cpu_src": cpu_src, "cpu_dst": cpu_dst}


def table(reps: int = 3) -> list[dict]:
    """Rows (one channel, multifd 4) × (plain, TLS), medians of ``reps`` interleaved runs, and the limits."""
    configs = [(0, False, False), (0, True, False), (4, False, False), (4, True, False), (0, False, True),
               (0, True, True)]
    runs: dict[tuple[int, bool, bool], list[dict]] = {c: [] for c in configs}
    raw, raw_tls, raw_tls4 = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        make_pki(pki)
        for _ in range(reps):
            raw.append(raw_loopback(1, congestion=UNPACED))
            raw_tls.append(raw_tls_loopback(pki))
            raw_tls4.append(raw_tls_loopback(pki, connections=4))
            for channels, tls, postcopy in configs:
                with tempfile.TemporaryDirectory() as run_tmp:
                    runs[(channels, tls, postcopy)].append(
                        asyncio.run(_migrate(Path(run_tmp), pki, tls, channels, postcopy)))
    rows = []
    for (channels, tls, postcopy), rs in runs.items():
        rows.append({"channels": channels, "tls": tls, "postcopy": postcopy, "s": statistics.median(r["s"] for r in rs),
                     "cpu_src": statistics.median(r["cpu_src"] for r in rs),
                     "cpu_dst": statistics.median(r["cpu_dst"] for r in rs),
                     "raw_s": statistics.median(raw), "raw_tls_s": statistics.median(raw_tls),
                     "raw_tls4_s": statistics.median(raw_tls4)})
    return rows


def main(reps: int = 3) -> None:
    rows = table(reps)
    plain1 = next(r["s"] for r in rows if r["channels"] == 0 and not r["tls"] and not r["postcopy"])
    print(f"### TLS against plain, 1 GiB random, tcp loopback (median of {reps}, interleaved)\n")
    print(f"Limits, same run: raw loopback, one connection ({UNPACED.decode()}): {rows[0]['raw_s']:.3f} s; "
          f"raw TLS 1.3 loopback, Python's ssl on both ends, one connection: {rows[0]['raw_tls_s']:.3f} s, "
          f"four connections (a process at each end of each): {rows[0]['raw_tls4_s']:.3f} s.\n")
    print("| channels | TLS | s | × one-channel plain speed | CPU s/GiB src | CPU s/GiB dst |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tls = ("yes" if r["tls"] else "no") + (", postcopy-ram" + (" (relayed)" if r["tls"] else "")
                                                if r["postcopy"] else "")
        print(f"| {r['channels'] or '1 (no multifd)'} | {tls} | {r['s']:.3f} | "
              f"{plain1 / r['s']:.2f} | {r['cpu_src']:.2f} | {r['cpu_dst']:.2f} |")
    print()
