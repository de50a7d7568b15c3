"""background-snapshot: the image equals memory at the instant the snapshot started, while writers keep
writing (their writes fault and wait for the fault server, a helper process, even while they hold the
GIL); the source keeps running; QEMU's rules; a fault server that dies fails the snapshot, never the
program."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mig_core.control.manager import MigrationManager
from mig_core.host.features import background_snapshot_unsupported
from mig_core.machine.machine import Machine
from mig_core.machine.vcpu import Vcpu
from mig_core.memory.ram import Backing
from mig_core.plugin.hooks import make_plugin_manager
from mig_core.plugin.hookspecs import hookimpl
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.commands import MigrateArgs, MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState, Side
from mig_core.schema.migration import MigrationStatus as S
from mig_core.testing import connect, qmp_error, vcpu_records, wait_for_status, wait_records_advance, wait_until

pytestmark = pytest.mark.skipif(background_snapshot_unsupported() is not None,
                                reason=f"no userfaultfd write-protect here: {background_snapshot_unsupported()}")


class Instant:
    """A hook plugin: copies every block at the source's switchover, the instant the snapshot is of."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.copies: list[bytes] | None = None

    @hookimpl
    def mig_switchover(self, migration_id: str, side: Side) -> None:
        if side is Side.SOURCE:
            self.copies = [bytes(b.view) for b in self.machine.blocks]


def stamp_writer(machine: Machine, stop: threading.Event, counts: list[int]):
    """A vCPU writing time-stamped pages (numpy, holding the GIL while it writes) as fast as it can."""

    def run(v: Vcpu) -> None:
        rng = np.random.default_rng(v.index)
        while not stop.is_set():
            v.safe_point()
            for b in machine.blocks:
                pages = rng.integers(0, b.npages, 16)
                words = b.array.view(np.uint64).reshape(b.npages, -1)
                words[pages, 0] = time.monotonic_ns()
                words[pages, 1] = pages
                words[pages, 2] = v.index
                counts[v.index] += len(pages)
    return run


def caps(manager: MigrationManager, *names: str) -> None:
    manager.migrate_set_capabilities(from_qmp(MigrateSetCapabilitiesArgs, {"capabilities": [
        {"capability": n, "state": True} for n in names]}))


def test_image_equals_memory_at_the_instant_while_writers_run(tmp_path):
    m = Machine()
    m.add_ram("ram0", 32 << 20)
    m.add_ram("ram1", 8 << 20, backing=Backing.MEMFD)
    rng = np.random.default_rng(1)
    for b in m.blocks:
        b.array[: b.size // 2] = rng.integers(0, 256, b.size // 2, dtype=np.uint8)
    m.start_tracking()
    pm = make_plugin_manager()
    instant = Instant(m)
    pm.register(instant, "instant")
    src = MigrationManager(m, pm=pm)
    stop, counts = threading.Event(), [0, 0, 0]
    m.vcpus.run(stamp_writer(m, stop, counts), 3, name="writer")
    wait_until(lambda: all(counts))
    caps(src, "background-snapshot")
    image = tmp_path / "bg.img"
    src.migrate(MigrateArgs(uri=f"file:{image}"))
    wait_until(lambda: src.source.state in (S.COMPLETED, S.FAILED), timeout=60)
    assert src.source.state is S.COMPLETED, src.error_desc
    before = list(counts)
    wait_until(lambda: all(c > b for c, b in zip(counts, before, strict=True)))  # the writers run on
    assert m.run.state is RunState.RUNNING
    stop.set()
    assert instant.copies is not None
    live = [bytes(b.view) for b in m.blocks]
    assert live != instant.copies  # memory moved on during and after the snapshot ...
    dst_m = Machine(runstate=RunState.INMIGRATE)
    dst_m.add_ram("ram0", 32 << 20)
    dst_m.add_ram("ram1", 8 << 20, backing=Backing.MEMFD)
    dst_m.blocks[0].array[:] = 9  # stale contents the load must replace
    dst = MigrationManager(dst_m)
    dst.migrate_incoming(MigrateIncomingArgs(uri=f"file:{image}"))
    wait_until(lambda: dst.destination.state in (S.COMPLETED, S.FAILED), timeout=60)
    assert dst.destination.state is S.COMPLETED, dst.error_desc
    for got, want in zip(dst_m.blocks, instant.copies, strict=True):
        assert bytes(got.view) == want, got.name  # ... and the image is memory at the instant, exactly
    info = src.query_migrate()
    assert info.status is S.COMPLETED and info.downtime is not None
    m.close()
    dst_m.close()


async def test_reference_host_keeps_running_and_the_rules(start_host, tmp_path):
    h = start_host("--ram", "64M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "16M", name="src")
    c = await connect(h.sock)
    await c.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True}, {"capability": "events", "state": True}]})
    for other in ("postcopy-ram", "return-path", "multifd", "xbzrle", "auto-converge", "release-ram"):
        assert await qmp_error(c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": other, "state": True}]})) == f"Background-snapshot is not compatible with {other}"
    events: list[str] = []

    async def pump() -> None:
        async for ev in c.events:
            if ev["event"] == "MIGRATION":
                events.append(ev["data"]["status"])

    task = asyncio.get_running_loop().create_task(pump())
    await c.execute("migrate", {"uri": f"file:{tmp_path}/bg.img"})
    info = await wait_for_status(c, {"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    assert (await c.execute("query-status"))["status"] == "running"
    await wait_records_advance(c, 2, await vcpu_records(c, 2, tmp_path / "r"), tmp_path / "r")
    await wait_until_events(events, 3)
    assert events == ["setup", "active", "completed"]
    task.cancel()
    d = start_host("--ram", "64M", "--vcpus", "2", "--dirty-rate", "16M", "--incoming",
                   f"file:{tmp_path}/bg.img", name="dst")
    dc = await connect(d.sock)
    assert (await wait_for_status(dc, {"completed", "failed"}))["status"] == "completed"
    await dc.disconnect()
    await c.disconnect()
    f = start_host("--ram", f"64M,backing=file,path={tmp_path}/f.ram", name="filebacked")
    fc = await connect(f.sock)
    assert await qmp_error(fc.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True}]})) == (
        "Background-snapshot is not compatible with guest memory configuration")
    await fc.disconnect()


async def wait_until_events(events: list[str], n: int) -> None:
    for _ in range(500):
        if len(events) >= n:
            return
        await asyncio.sleep(0.01)


def _fault_server(parent: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"wp_server" in cmd:
            return int(pid)
    return None


async def test_a_dead_fault_server_fails_the_snapshot_not_the_program(start_host, tmp_path):
    h = start_host("--ram", "64M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "16M", name="src")
    c = await connect(h.sock)
    await c.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True}]})
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # the stream goes to a reader that waits for the test: the snapshot is held in the middle
    await c.execute("migrate", {"uri": f"exec:cat {gate} > /dev/null; cat > {tmp_path}/bg.img"})
    await asyncio.to_thread(wait_until, lambda: any(e.get("event") == "background_snapshot_instant"
                                                    for e in h.log_events()), 30)
    pid = _fault_server(h.proc.pid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # while it serves the running program's writes
    with open(gate, "w") as g:  # let the stream flow again
        g.write("go\n")
    info = await wait_for_status(c, {"completed", "failed"}, timeout=60)
    assert info["status"] == "failed" and "the snapshot's fault server exited" in info["error-desc"], info
    assert (await c.execute("query-status"))["status"] == "running"
    await wait_records_advance(c, 2, await vcpu_records(c, 2, tmp_path / "r"), tmp_path / "r")
    # and the next snapshot works (the tracker and the registrations came back)
    await c.execute("migrate", {"uri": f"file:{tmp_path}/again.img"})
    assert (await wait_for_status(c, {"completed", "failed"}, timeout=60))["status"] == "completed"
    await c.disconnect()
