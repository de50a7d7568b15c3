"""``mig demo``: a real live migration between two ``mig run`` processes on this machine.

The source runs a workload (vCPU threads dirtying RAM, a device); the
destination waits with ``-S``. mig demo migrates while showing progress,
checks that the destination's RAM equals the source's byte for byte at
switchover, resumes the destination and checks the workload goes on there,
then prints a summary. It exits non-zero if any check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import click
from qemu.qmp import QMPClient
from rich.console import Console

from mig_core.cli.options import parse_caps, parse_params
from mig_core.cli.progress import follow, summary_table
from mig_core.machine.reference_host import RECORD, RECORD_STRIDE, parse_size


class DemoFailed(click.ClickException):
    exit_code = 1


def _start(tmp: Path, name: str, args: list[str]) -> tuple[subprocess.Popen[str], Path]:
    sock = tmp / f"{name}.sock"
    env = dict(os.environ, MIG_LOG_LEVEL=os.environ.get("MIG_LOG_LEVEL", "warning"))
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{sock}", *args],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    if "listening" not in proc.stdout.readline():
        raise DemoFailed(f"the {name} host did not start; see {tmp / (name + '.log')}")
    return proc, sock


@click.command()
@click.option("--ram", default="256M", show_default=True, help="RAM size of both hosts (K, M, G suffixes).")
@click.option("--dirty-rate", default="32M", show_default=True, help="Bytes per second the workload dirties.")
@click.option("--vcpus", default=2, show_default=True, type=click.IntRange(1, 64), help="vCPU threads.")
@click.option("--fill", type=click.Choice(["zero", "random", "half", "text"]), default="half", show_default=True,
              help="Initial RAM contents of the source.")
@click.option("--uri", default="tcp:127.0.0.1:0", show_default=True,
              help="Where the destination listens (tcp:HOST:PORT, unix:PATH; port 0 picks one).")
@click.option("--cap", "caps", multiple=True, metavar="NAME=on|off",
              help="Set a capability on both sides (events and return-path are on unless turned off).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Set a parameter on the source.")
def demo(ram: str, dirty_rate: str, vcpus: int, fill: str, uri: str, caps: tuple[str, ...],
         params: tuple[str, ...]) -> None:
    """Live-migrate a running workload between two processes and verify the result."""
    # a return path makes downtime honest: it lasts until the destination confirms it runs
    requested = {c["capability"]: c for c in parse_caps(caps)}
    defaults = {"events": {"capability": "events", "state": True},
                "return-path": {"capability": "return-path", "state": True}}
    cap_list = list({**defaults, **requested}.values())
    param_map = {"max-bandwidth": 0, **parse_params(params)}
    try:
        ram_size = parse_size(ram, "RAM size")
        parse_size(dirty_rate, "dirty rate")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    console = Console()
    with tempfile.TemporaryDirectory(prefix="mig-demo-") as tmp_s:
        tmp = Path(tmp_s)
        common = ["--ram", ram, "--vcpus", str(vcpus), "--dirty-rate", dirty_rate]
        procs = []
        try:
            src_p, src_sock = _start(tmp, "source", [*common, "--ram-fill", fill])
            procs.append(src_p)
            dst_p, dst_sock = _start(tmp, "destination", [*common, "--incoming", "defer", "-S"])
            procs.append(dst_p)
            ok = asyncio.run(_migrate(console, tmp, src_sock, dst_sock, ram_size, vcpus, uri, cap_list, param_map))
        finally:
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
                if p.poll() is None:
                    p.kill()
    if not ok:
        raise DemoFailed("verification failed")
    console.print("[bold green]demo: live migration verified[/]")


async def _digest(client: QMPClient, size: int, path: Path) -> str:
    await client.execute("pmemsave", {"val": 0, "size": size, "filename": str(path)})
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    path.unlink()
    return h.hexdigest()


async def _records(client: QMPClient, vcpus: int, path: Path) -> list[tuple[int, ...]]:
    await client.execute("pmemsave", {"val": 0, "size": 4096, "filename": str(path)})
    data = path.read_bytes()
    return [RECORD.unpack_from(data, i * RECORD_STRIDE) for i in range(vcpus)]


async def _migrate(console: Console, tmp: Path, src_sock: Path, dst_sock: Path, ram_size: int, vcpus: int,
                   uri: str, caps: list[dict[str, Any]], params: dict[str, Any]) -> bool:
    src, dst = QMPClient("demo-source"), QMPClient("demo-destination")
    await src.connect(str(src_sock))
    await dst.connect(str(dst_sock))
    try:
        for c in (src, dst):  # both sides: multifd settings (channels, compression) must match
            await c.execute("migrate-set-capabilities", {"capabilities": caps})
            await c.execute("migrate-set-parameters", params)
        if uri.startswith("unix:") and uri == "unix:":
            uri = f"unix:{tmp / 'migration.sock'}"
        await dst.execute("migrate-incoming", {"uri": uri})
        listening = cast(dict[str, Any], await dst.execute("query-migrate"))
        target = uri
        addrs = listening.get("socket-address") or []
        if uri.startswith("tcp:") and addrs:
            target = f"tcp:{addrs[0]['host']}:{addrs[0]['port']}"
        console.print(f"source {src_sock.name} → destination {dst_sock.name} via {target}; "
                      f"{ram_size >> 20} MiB RAM, {vcpus} vCPUs")
        await asyncio.sleep(0.5)  # let the workload dirty some memory first
        t0 = time.monotonic()
        await src.execute("migrate", {"uri": target})
        info = await follow(src, console)
        wall = time.monotonic() - t0
        if info["status"] != "completed":
            console.print(summary_table(info, ram_size, wall))
            return False
        for _ in range(200):
            d = cast(dict[str, Any], await dst.execute("query-migrate"))
            if d.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        console.print(summary_table(info, ram_size, wall))
        ok = True
        equal = await _digest(src, ram_size, tmp / "s.mem") == await _digest(dst, ram_size, tmp / "d.mem")
        console.print(f"RAM identical on both sides at switchover: {'yes' if equal else 'NO'}")
        ok &= equal
        before = await _records(dst, vcpus, tmp / "r1")
        await dst.execute("cont")
        await asyncio.sleep(0.5)
        after = await _records(dst, vcpus, tmp / "r2")
        goes_on = all(a[0] > b[0] for a, b in zip(after, before, strict=True))
        console.print(f"workload continues on the destination after cont: {'yes' if goes_on else 'NO'} "
                      f"(vCPU counters {[b[0] for b in before]} → {[a[0] for a in after]})")
        ok &= goes_on
        return ok
    finally:
        for c in (src, dst):
            with contextlib.suppress(Exception):
                await c.execute("quit")
            with contextlib.suppress(Exception):
                await c.disconnect()
