"""What every benchmark does with its host processes: QMP clients that are closed, and hosts that are stopped,
however a run ends; and the /proc figures measured of them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from mig_core.testing import connect, migrate_and_wait, wait_for_status


@contextlib.asynccontextmanager
async def qmp_clients(*hosts: Any) -> AsyncIterator[list[QMPClient]]:
    """A negotiated client per host, in order: mig's ``Host`` (by its socket) or any host with an async
    ``client()`` (``benchmarks.qemu.QemuHost``). The clients disconnect when the block ends; every host is
    stopped whatever happens."""
    try:
        clients = [await (h.client() if hasattr(h, "client") else connect(h.sock)) for h in hosts]
        yield clients
        for c in clients:
            with contextlib.suppress(EOFError, OSError):  # a host the benchmark killed
                await c.disconnect()
    finally:
        for h in hosts:
            h.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and every process it started that is part of its work (a
    TLS relay, a postcopy page server, their session children): ``/proc/PID/stat`` of each live one, with
    what each has reaped of its own exited children (clock-tick resolution)."""
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
    children: dict[int, list[int]] = {}
    for p, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(p)  # field 4 of stat: the parent
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        fields = stats.get(p)
        if fields is None:
            continue
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # utime stime cutime cstime
        todo.extend(children.get(p, ()))
    return ticks / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def migrate_measured(src: QMPClient, dst: QMPClient, s: Any, d: Any) -> tuple[dict[str, Any], float, float]:
    """Listen on a loopback port, migrate there and wait until both sides completed: the source's final
    ``query-migrate`` and the CPU-seconds each host process spent meanwhile."""
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    cpu0 = cpu_seconds(s.proc.pid), cpu_seconds(d.proc.pid)
    info = await migrate_and_wait(src, {"uri": f"tcp:127.0.0.1:{port}"})
    assert info["status"] == "completed", info
    await wait_for_status(dst, {"completed"})
    return info, cpu_seconds(s.proc.pid) - cpu0[0], cpu_seconds(d.proc.pid) - cpu0[1]


async def configure_both(clients: list[QMPClient], caps: list[str], params: dict[str, Any]) -> None:
    """The same capabilities (switched on) and parameters on every host, as a migration's two ends need."""
    for c in clients:
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": x, "state": True}
                                                                      for x in caps]})
        await c.execute("migrate-set-parameters", params)
