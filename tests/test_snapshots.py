"""snapshot-save / snapshot-load / snapshot-delete end to end: a real ``mig run`` with its RAM, workload and
device, real snapshot backends on disk, a real qemu.qmp client; QEMU's job transcripts and error texts."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mig_core.testing import connect, qmp_error, ram_digest, run_job, vcpu_records, wait_records_advance

RAM = 24 << 20
WL = ("--ram", "16M", "--ram", "extra=8M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "4M")


def collect(client: Any) -> list[dict[str, Any]]:
    """Every event the client receives from now on (a task appends them)."""
    seen: list[dict[str, Any]] = []

    async def pump() -> None:
        async for ev in client.events:
            seen.append(ev)

    seen_task = asyncio.get_running_loop().create_task(pump())
    seen_task.add_done_callback(lambda t: None)
    return seen


def transcript(events: list[dict[str, Any]], job_id: str) -> list[str]:
    """The job's status changes, with the STOP/RESUME events among them."""
    out = []
    for e in events:
        if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id:
            out.append(e["data"]["status"])
        elif e["event"] in ("STOP", "RESUME") and out and out[-1] != "concluded":
            out.append(e["event"])
    return out


async def save_devices(client: Any, path: Path) -> bytes:
    await client.execute("xen-save-devices-state", {"filename": str(path)})
    return path.read_bytes()


def snap(job: str, tag: str, *devices: str, vmstate: str | None = None) -> dict[str, Any]:
    return {"job-id": job, "tag": tag, "vmstate": vmstate or devices[0], "devices": list(devices)}


@pytest.mark.parametrize("backend", ["dir", "dedup"])
async def test_save_and_load_are_byte_exact(start_host, tmp_path, backend):
    h = start_host(*WL, "--snapshot-dir", f"{tmp_path}/snaps,backend={backend}", name="h")
    c = await connect(h.sock)
    events = collect(c)
    # a running machine: QEMU's transcript, and it runs again after
    info = await run_job(c, "snapshot-save", snap("save0", "live", "snap0"), dismiss=False)
    assert info["status"] == "concluded" and "error" not in info, info
    assert info["current-progress"] == info["total-progress"] == RAM // 4096
    await c.execute("job-dismiss", {"id": "save0"})
    await c.execute("query-status")
    assert transcript(events, "save0") == ["created", "running", "STOP", "RESUME", "waiting", "pending",
                                           "concluded", "null"]
    assert (await c.execute("query-status"))["status"] == "running"
    assert (await c.execute("query-migrate"))["status"] == "completed"  # savevm reports as QEMU's does
    # a stopped machine: what was saved is exactly what a load brings back, RAM and device state
    await c.execute("stop")
    before = await ram_digest(c, RAM, tmp_path / "d0")
    devices_before = await save_devices(c, tmp_path / "dev0")
    assert "error" not in await run_job(c, "snapshot-save", snap("save1", "still", "snap0"))
    await c.execute("cont")
    await wait_records_advance(c, 2, await vcpu_records(c, 2, tmp_path / "r"), tmp_path / "r")
    await c.execute("stop")
    assert await ram_digest(c, RAM, tmp_path / "d1") != before
    assert "error" not in await run_job(c, "snapshot-load", snap("load1", "still", "snap0"))
    assert await ram_digest(c, RAM, tmp_path / "d2") == before
    assert await save_devices(c, tmp_path / "dev2") == devices_before
    assert (await c.execute("query-status"))["status"] == "paused"  # the run state it had
    # loading into a running machine: stopped meanwhile, running after, the workload goes on
    await c.execute("cont")
    n = len(events)
    assert "error" not in await run_job(c, "snapshot-load", snap("load2", "live", "snap0"), dismiss=False)
    assert transcript(events[n:], "load2") == ["created", "running", "STOP", "RESUME", "waiting", "pending",
                                               "concluded"]
    assert (await c.execute("query-status"))["status"] == "running"
    await wait_records_advance(c, 2, await vcpu_records(c, 2, tmp_path / "r"), tmp_path / "r")
    listed = await c.execute("x-query-snapshots")
    assert [(s["node"], s["backend"], s["name"], s["ram-size"]) for s in listed] == [
        ("snap0", backend, "live", RAM), ("snap0", backend, "still", RAM)]
    assert all(RAM // 4 < s["vm-state-size"] <= RAM for s in listed)  # about half the pages hold data
    assert "error" not in await run_job(c, "snapshot-delete", {"job-id": "del", "tag": "live",
                                                               "devices": ["snap0"]})
    assert [s["name"] for s in await c.execute("x-query-snapshots")] == ["still"]
    await c.disconnect()


async def test_qemu_rules_and_texts(start_host, tmp_path):
    h = start_host(*WL, "--snapshot-dir", f"{tmp_path}/a", "--snapshot-dir", f"{tmp_path}/b,node-name=disk1",
                   name="h")
    c = await connect(h.sock)

    async def job_error(command: str, arguments: dict[str, Any]) -> str | None:
        return (await run_job(c, command, arguments)).get("error")

    assert await job_error("snapshot-save", snap("s", "t", "snap0", "disk1")) is None
    assert await job_error("snapshot-save", {"job-id": "s", "tag": "u", "vmstate": "snap0", "devices": []}) == (
        "At least one device is required for snapshot")
    assert await job_error("snapshot-save", snap("s", "u", "nope")) == "No block device node 'nope'"
    assert await job_error("snapshot-save", snap("s", "t", "disk1")) == (
        "Snapshot 't' already exists in one or more devices")
    assert await job_error("snapshot-save", snap("s", "u", "snap0", vmstate="disk1")) == (
        "vmstate block device 'disk1' does not exist")
    assert (await c.execute("query-status"))["status"] == "running"  # refused before stopping anything
    assert await job_error("snapshot-load", snap("l", "zz", "snap0")) == (
        "Snapshot 'zz' does not exist in one or more devices")
    assert (await c.execute("query-status"))["status"] == "restore-vm"  # QEMU stops first and stays stopped
    await c.execute("cont")
    assert await job_error("snapshot-load", snap("l", "t", "snap0", "disk1", vmstate="disk1")) == (
        "This is a disk-only snapshot. Revert to it  offline using qemu-img")
    await c.execute("cont")
    assert await job_error("snapshot-delete", {"job-id": "d", "tag": "zz", "devices": ["snap0"]}) is None
    listed = await c.execute("x-query-snapshots")
    assert [(s["node"], s["name"], s["vm-state-size"] > 0) for s in listed] == [("snap0", "t", True),
                                                                                ("disk1", "t", False)]
    await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    for command in ("snapshot-save", "snapshot-load"):
        assert await job_error(command, snap("m", "t2" if command == "snapshot-save" else "t", "snap0")) == (
            "Snapshots are not compatible with multifd")
    await c.execute("cont")
    await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": False}]})
    # a migration in progress (held in pre-switchover, machine stopped): refused, and the migration goes on
    await c.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": True}]})
    await c.execute("migrate", {"uri": f"exec:cat > {tmp_path}/out.img"})
    while (await c.execute("query-migrate"))["status"] != "pre-switchover":
        await asyncio.sleep(0.02)
    assert await job_error("snapshot-save", snap("p", "t3", "snap0")) == "There's a migration process in progress"
    assert await job_error("snapshot-load", snap("p", "t", "snap0")) == "There's a migration process in progress"
    assert (await c.execute("query-status"))["status"] == "finish-migrate"
    await c.execute("migrate-continue", {"state": "pre-switchover"})
    while (await c.execute("query-migrate"))["status"] != "completed":
        await asyncio.sleep(0.02)
    assert await qmp_error(c.execute("job-dismiss", {"id": "p"})) == "Job not found"
    await c.disconnect()


@pytest.mark.parametrize("backend", ["dir", "dedup"])
async def test_kill_during_a_save_leaves_earlier_tags_loadable(start_host, tmp_path, backend):
    spec = f"{tmp_path}/snaps,backend={backend}"
    args = ("--ram", "128M", "--ram-fill", "random", "--snapshot-dir", spec)
    h = start_host(*args, name="victim")
    c = await connect(h.sock)
    await c.execute("stop")
    saved = await ram_digest(c, 128 << 20, tmp_path / "a")
    assert "error" not in await run_job(c, "snapshot-save", snap("a", "a", "snap0"))
    await c.execute("cont")
    await c.execute("snapshot-save", snap("b", "b", "snap0"))
    await c.execute("job-pause", {"id": "b"})  # held mid-save at its next checkpoint, then killed there
    while (await c.execute("query-jobs"))[0]["status"] != "paused":
        await asyncio.sleep(0.01)
    assert list((tmp_path / "snaps" / "tags").glob(".new-*")), "the save was not under way"
    h.proc.kill()
    h.proc.wait()
    with contextlib.suppress(Exception):
        await c.disconnect()
    h2 = start_host(*args, name="after")
    c2 = await connect(h2.sock)
    assert [s["name"] for s in await c2.execute("x-query-snapshots")] == ["a"]
    assert not list((tmp_path / "snaps" / "tags").glob(".new-*"))  # the torn save was cleared away
    await c2.execute("stop")  # the workload's records would change RAM after a load into a running machine
    assert "error" not in await run_job(c2, "snapshot-load", snap("l", "a", "snap0"))
    assert await ram_digest(c2, 128 << 20, tmp_path / "a2") == saved
    assert "error" not in await run_job(c2, "snapshot-save", snap("b", "b", "snap0"))  # the tag is free again
    await c2.disconnect()


def mig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True, timeout=120)


async def test_mig_snapshot_commands(start_host, tmp_path):
    h = start_host(*WL, "--snapshot-dir", f"{tmp_path}/s,backend=dedup", name="h")
    sock = str(h.sock)
    assert mig("snapshot", "list", sock).stdout.strip() == "no snapshots"
    r = await asyncio.to_thread(mig, "snapshot", "save", sock, "first")
    assert (r.returncode, r.stdout.strip()) == (0, "saved first"), r.stderr
    r = await asyncio.to_thread(mig, "snapshot", "save", sock, "first")
    assert r.returncode == 1 and "Snapshot 'first' already exists in one or more devices" in r.stderr
    r = await asyncio.to_thread(mig, "snapshot", "list", sock)
    assert "first" in r.stdout and "snap0" in r.stdout and "24.0 MiB" in r.stdout, r.stdout
    r = await asyncio.to_thread(mig, "snapshot", "load", sock, "first")
    assert (r.returncode, r.stdout.strip()) == (0, "loaded first"), r.stderr
    r = await asyncio.to_thread(mig, "snapshot", "delete", sock, "first")
    assert (r.returncode, r.stdout.strip()) == (0, "deleted first"), r.stderr
    assert mig("snapshot", "list", sock).stdout.strip() == "no snapshots"
    r = mig("run", "--qmp", f"unix:{tmp_path}/x.sock", "--snapshot-dir", f"{tmp_path}/s2,backend=nosuch")
    assert r.returncode == 2 and "nosuch" in r.stderr and "mig_core.snapshot_backends" in r.stderr, r.stderr
