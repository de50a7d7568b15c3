"""TLS against plain migration, 1 GiB random RAM, in one run: one channel and multifd 4, with the CPU each side
spends per GiB, beside raw loopback and raw TLS loopback (Python's ssl over one connection) measured the same run.
One more row: one channel with ``postcopy-ram`` on both sides (no switch), so the destination's session ends
in the TLS relay process, whose CPU the destination's column does not count.

``make bench WHICH=tls``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def raw_tls_loopback(pki: Path, size: int = GIB) -> float:
    """Seconds to move ``size`` random bytes through one TLS 1.3 connection on loopback, Python's ssl on a
    socket at each end (the sender with the congestion control mig's transport picks): TLS's own limit."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    rx = subprocess.Popen([sys.executable, "-c", _TLS_RECEIVER, str(size), str(pki)], stdout=subprocess.PIPE,
                          text=True)
    assert rx.stdout is not None
    port = int(rx.stdout.readline())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(pki / "ca-cert.pem"))
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, UNPACED)  # as mig's transport sets them
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    mv = memoryview(data)
    t = time.perf_counter()
    for off in range(0, size, 4 << 20):
        s.sendall(mv[off:off + (4 << 20)])
    s.recv(1)
    elapsed = time.perf_counter() - t
    s.close()
    rx.wait()
    return elapsed


async def _migrate(tmp: Path, pki: Path, tls: bool | str, channels: int) -> dict:
    obj = lambda end: (f"--object=tls-creds-x509,id=tls0,dir={pki},endpoint={end}",  # noqa: E731
                       "--param", "tls-creds=tls0") if tls else ()
    s = Host(tmp, "--ram", "1G", "--ram-fill", "random", *obj("client"), name="src", env=ENV)
    d = Host(tmp, "--ram", "1G", "--mem-prealloc", *obj("server"), "-S", "--incoming", "defer", name="dst", env=ENV)
    async with qmp_clients(s, d) as (src, dst):
        caps = ["return-path"] + (["multifd"] if channels else []) + (["postcopy-ram"] if tls == "relayed" else [])
        await configure_both([src, dst], caps, {"max-bandwidth": 0, **({"multifd-channels": channels}
                                                                      if channels else {})})
        info, cpu_src, cpu_dst = await migrate_measured(src, dst, s, d)
    return {"s": info["total-time"] / 1000, "cpu_src": cpu_src, "cpu_dst": cpu_dst}


def table(reps: int = 3) -> list[dict]:
    """Rows (one channel, multifd 4) × (plain, TLS), medians of ``reps`` interleaved runs, and the limits."""
    configs: list[tuple[int, bool | str]] = [(0, False), (0, True), (4, False), (4, True), (0, "relayed")]
    runs: dict[tuple[int, bool | str], list[dict]] = {c: [] for c in configs}
    raw, raw_tls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        make_pki(pki)
        for _ in range(reps):
            raw.append(raw_loopback(1, congestion=UNPACED))
            raw_tls.append(raw_tls_loopback(pki))
            for channels, tls in configs:
                with tempfile.TemporaryDirectory() as run_tmp:
                    runs[(channels, tls)].append(asyncio.run(_migrate(Path(run_tmp), pki, tls, channels)))
    rows = []
    for (channels, tls), rs in runs.items():
        rows.append({"channels": channels, "tls": tls, "s": statistics.median(r["s"] for r in rs),
                     "cpu_src": statistics.median(r["cpu_src"] for r in rs),
                     "cpu_dst": statistics.median(r["cpu_dst"] for r in rs),
                     "raw_s": statistics.median(raw), "raw_tls_s": statistics.median(raw_tls)})
    return rows


def main(reps: int = 3) -> None:
    rows = table(reps)
    plain1 = next(r["s"] for r in rows if r["channels"] == 0 and not r["tls"])
    print(f"### TLS against plain, 1 GiB random, tcp loopback (median of {reps}, interleaved)\n")
    print(f"Limits, same run: raw loopback, one connection ({UNPACED.decode()}): {rows[0]['raw_s']:.3f} s; "
          f"raw TLS 1.3 loopback, one connection, Python's ssl on both ends: {rows[0]['raw_tls_s']:.3f} s.\n")
    print("| channels | TLS | s | × one-channel plain speed | CPU s/GiB src | CPU s/GiB dst |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tls = {False: "no", True: "yes", "relayed": "yes, relayed (postcopy-ram)"}[r["tls"]]
        print(f"| {r['channels'] or '1 (no multifd)'} | {tls} | {r['s']:.3f} | "
              f"{plain1 / r['s']:.2f} | {r['cpu_src']:.2f} | {r['cpu_dst']:.2f} |")
    print()
