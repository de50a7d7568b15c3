"""Live precopy migration between two real mig run processes, driven through qemu.qmp."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from mig_core.testing import (
    connect,
    freeze,
    migrate_and_wait,
    qmp_error,
    ram_digest,
    vcpu_records,
    wait_for_status,
    wait_records_advance,
    wait_until_async,
)

RAM = 32 << 20
WORKLOAD = ("--ram", "32M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "8M")


async def pair(start_host, *, src_args=WORKLOAD, dst_args=WORKLOAD + ("-S",), caps=("events",)):
    src_h = start_host(*src_args, name="src")
    dst_h = start_host(*dst_args, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    for c in (src, dst):
        if caps:
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": x, "state": True} for x in caps]})
    return src_h, dst_h, src, dst


async def collect_events(client, into: list):
    async for ev in client.events:
        into.append(ev)


def addr_args(form: str, kind: str, tmp_path, port: str = "0"):
    if kind == "tcp":
        if form == "uri":
            return {"uri": f"tcp:127.0.0.1:{port}"}
        return {"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                                                "host": "127.0.0.1", "port": port}}]}
    path = str(tmp_path / "mig.sock")
    if form == "uri":
        return {"uri": f"unix:{path}"}
    return {"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": path}}]}


@pytest.mark.parametrize("form", ["uri", "channels"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_live_migration(start_host, tmp_path, kind, form):
    src_h, dst_h, src, dst = await pair(start_host, caps=("events", "return-path"))
    src_events, dst_events = [], []
    tasks = [asyncio.create_task(collect_events(src, src_events)),
             asyncio.create_task(collect_events(dst, dst_events))]
    try:
        await dst.execute("migrate-incoming", addr_args(form, kind, tmp_path))
        listening = await dst.execute("query-migrate")
        assert listening["status"] == "setup"
        port = "0"
        if kind == "tcp":
            (sa,) = listening["socket-address"]
            assert sa["type"] == "inet" and sa["host"] == "127.0.0.1" and int(sa["port"]) > 0
            port = sa["port"]
        else:
            assert listening["socket-address"] == [{"type": "unix", "path": str(tmp_path / "mig.sock")}]
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await src.execute("migrate", addr_args(form, kind, tmp_path, port))
        done = await wait_for_status(src, {"completed", "failed"})
        assert done["status"] == "completed", done
        ram = done["ram"]
        assert ram["total"] == RAM and ram["remaining"] == 0 and ram["page-size"] == 4096
        assert ram["normal"] >= RAM // 2 // 4096 and ram["duplicate"] > 0
        assert ram["normal-bytes"] == ram["normal"] * 4096
        assert ram["transferred"] >= ram["normal-bytes"] and ram["dirty-sync-count"] >= 2
        assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
        assert done["total-time"] >= done["downtime"] >= 0 and done["setup-time"] >= 0
        await wait_for_status(dst, {"completed"})
        assert await src.execute("query-status") == {"running": False, "status": "postmigrate"}
        assert await dst.execute("query-status") == {"running": False, "status": "paused"}  # -S
        # both sides paused: RAM equal byte for byte
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
        before = await vcpu_records(dst, 2, tmp_path / "r1")
        assert all(r[0] > 0 for r in before)
        await dst.execute("cont")
        await wait_records_advance(dst, 2, before, tmp_path / "r2")  # the workload continues there
        await wait_until_async(lambda: any(e["event"] == "RESUME" for e in dst_events))
        names = lambda evs: [e["data"]["status"] for e in evs if e["event"] == "MIGRATION"]  # noqa: E731
        assert names(src_events) == ["setup", "active", "device", "completed"]
        assert names(dst_events) == ["setup", "active", "completed"]
        passes = [e["data"]["pass"] for e in src_events if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) == ram["dirty-sync-count"]
        assert [e["event"] for e in dst_events if e["event"] in ("STOP", "RESUME")] == ["RESUME"]
        assert [e["event"] for e in src_events if e["event"] in ("STOP", "RESUME")] == ["STOP"]
        # a source in postmigrate refuses another migrate until it is continued
        with pytest.raises(Exception, match="Can't migrate the vm that was paused due to previous migration"):
            await src.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
    finally:
        for t in tasks:
            t.cancel()
        for c in (src, dst):
            with contextlib.suppress(Exception):
                await c.disconnect()


async def test_pause_before_switchover(start_host, tmp_path):
    src_h, dst_h, src, dst = await pair(start_host, caps=("events", "pause-before-switchover"))
    try:
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/p.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/p.sock"})
        info = await wait_for_status(src, {"pre-switchover"})
        assert info["expected-downtime"] >= 0 and "downtime" not in info
        assert (await src.execute("query-status"))["status"] == "finish-migrate"
        with pytest.raises(Exception, match="Migration not in expected state: pre-switchover"):
            await src.execute("migrate-continue", {"state": "active"})
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_cont_refused_from_the_final_stop_to_completion(start_host, tmp_path):
    """No command resumes the source between its final stop and the end (QEMU: finish-migrate refuses cont)."""
    src_h, dst_h, src, dst = await pair(start_host, caps=("events", "pause-before-switchover", "return-path"))
    spammer = await connect(src_h.sock, "spam")
    replies: list[str] = []
    spamming = asyncio.Event()
    spamming.set()

    async def spam() -> None:
        while spamming.is_set():
            replies.append(await qmp_error(spammer.execute("cont")))

    try:
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/c.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/c.sock"})
        await wait_for_status(src, {"pre-switchover"})
        assert await qmp_error(src.execute("cont")) == "Migration is not finalized yet"
        assert (await src.execute("query-status"))["status"] == "finish-migrate"
        task = asyncio.create_task(spam())
        # the destination is frozen: with a return path the source then waits in device for its answer
        freeze(dst_h.proc.pid)
        try:
            await src.execute("migrate-continue", {"state": "pre-switchover"})
            await wait_for_status(src, {"device"})
            assert await qmp_error(src.execute("cont")) == "Migration is not finalized yet"
            assert await src.execute("query-status") == {"running": False, "status": "finish-migrate"}
            spamming.clear()
            await task
        finally:
            os.kill(dst_h.proc.pid, signal.SIGCONT)
        assert replies and set(replies) == {"Migration is not finalized yet"}
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        await wait_for_status(dst, {"completed"})
        assert await src.execute("query-status") == {"running": False, "status": "postmigrate"}
        assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    finally:
        for c in (src, dst, spammer):
            with contextlib.suppress(Exception):
                await c.disconnect()


async def test_destination_runs_without_dash_s(start_host, tmp_path):
    src_h, dst_h, src, dst = await pair(start_host, dst_args=WORKLOAD, caps=())
    try:
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/r.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        await wait_for_status(dst, {"completed"})
        assert await dst.execute("query-status") == {"running": True, "status": "running"}
        # the source, continued, may migrate again: it runs again and its workload goes on
        await src.execute("cont")
        assert await src.execute("query-status") == {"running": True, "status": "running"}
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_migrate_and_wait_follows_the_migration_event(start_host):
    """The benchmarks' helper: no polling, it returns once the MIGRATION event says the migration ended."""
    src_h, dst_h, src, dst = await pair(start_host, src_args=("--ram", "16M", "--ram-fill", "random"),
                                        dst_args=("--ram", "16M", "-S"), caps=())
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    info = await migrate_and_wait(src, {"uri": f"tcp:127.0.0.1:{port}"})
    assert info["status"] == "completed" and info["ram"]["normal"] >= (16 << 20) // 4096 - 64
    caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    assert caps["events"] is True
    # a destination that is gone: the event says failed, and the helper returns that instead of waiting
    src2_h = start_host("--ram", "16M", "--ram-fill", "random", name="src2")
    src2 = await connect(src2_h.sock, "src2")
    failed = await migrate_and_wait(src2, {"uri": f"tcp:127.0.0.1:{port}"}, timeout=30)
    assert failed["status"] == "failed" and "error-desc" in failed
