"""COLO between two real ``mig run`` processes: checkpoints, output comparison, failover either way.

Each host emits messages that follow from its state (``mig run --output``) and appends the ones it
releases to a file. Whatever happens, the released messages of both files together must be one
sequence: no number missing, a number released twice only with the same contents, and (without
divergence) every message the hash of the one before, so the survivor continued the very state whose
output the primary released.
"""

from __future__ import annotations

import os
import signal

import pytest
from mig_colo.testing import (
    PATIENT,
    WORKLOAD,
    assert_one_sequence,
    checkpoints,
    colo_pair,
    disconnect,
    released,
    status_after_failover,
    wait_event,
)

from mig_core.testing import connect, qmp_error, wait_for_status, wait_until_async


async def test_colo_runs_both_sides_and_releases_what_matched(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path)
    try:
        assert await src.execute("query-colo-status") == {"mode": "primary", "last-mode": "none", "reason": "none"}
        assert await dst.execute("query-colo-status") == {"mode": "secondary", "last-mode": "none",
                                                          "reason": "none"}
        assert (await src.execute("query-status"))["status"] == "running"
        assert (await dst.execute("query-status"))["status"] == "running"
        stats = await checkpoints(src, 3)
        assert stats["mode"] == "primary"
        assert stats["reasons"] == [{"reason": "periodic", "count": stats["checkpoints"]}]
        assert stats["compare"]["matched"] > 0 and stats["compare"]["mismatches"] == 0
        assert (await dst.execute("x-query-colo-stats"))["mode"] == "secondary"
        # the secondary releases nothing while the primary runs
        assert not os.path.exists(tmp_path / "s.out") or os.path.getsize(tmp_path / "s.out") == 0
        assert_one_sequence(released(tmp_path / "p.out"), chained=True)
        # capabilities cannot change while COLO runs, and a second migration is refused
        assert "in progress" in await qmp_error(src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"}))
    finally:
        await disconnect(src, dst)


@pytest.mark.parametrize(("side", "command"), [("primary", "x-colo-lost-heartbeat"),
                                               ("secondary", "x-colo-lost-heartbeat"),
                                               ("secondary", "xen-set-replication")])
async def test_lost_heartbeat_on_either_side(start_host, tmp_path, side, command):
    """x-colo-lost-heartbeat (or xen-set-replication failover=true): that side takes over at once; the other
    sees the connection go and follows (automatic failover), so both run alone."""
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path)
    try:
        await checkpoints(src, 1)
        me, other = (src, dst) if side == "primary" else (dst, src)
        if command == "xen-set-replication":
            await me.execute(command, {"enable": False, "primary": side == "primary", "failover": True})
        else:
            await me.execute(command)
        ev = await wait_event(me, "COLO_EXIT")
        assert ev["data"] == {"mode": side, "reason": "request"}
        await wait_for_status(me, {"completed"})
        status = await status_after_failover(me)
        assert status == {"mode": "none", "last-mode": side, "reason": "request"}
        assert await qmp_error(me.execute("x-colo-lost-heartbeat")) == "VM is not in COLO mode"
        assert (await me.execute("query-status"))["status"] == "running"
        await wait_for_status(other, {"completed"})
        assert (await other.execute("query-status"))["status"] == "running"
    finally:
        await disconnect(src, dst)


async def test_kill_primary_secondary_takes_over_with_nothing_lost(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path)
    try:
        await checkpoints(src, 2)
        before = len(released(tmp_path / "p.out"))
        src_h.proc.send_signal(signal.SIGKILL)
        src_h.proc.wait(10)
        await wait_for_status(dst, {"completed"}, timeout=30)
        status = await status_after_failover(dst)
        assert status["last-mode"] == "secondary" and status["mode"] == "none"
        assert (await dst.execute("query-status"))["status"] == "running"
        # the survivor goes on releasing: wait for messages beyond those the primary released
        await wait_until_async(lambda: max(released(tmp_path / "p.out", tmp_path / "s.out")) > before + 50)
        assert_one_sequence(released(tmp_path / "p.out", tmp_path / "s.out"), chained=True)
    finally:
        await disconnect(src, dst)


async def test_kill_secondary_primary_continues_alone(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path)
    try:
        await checkpoints(src, 2)
        dst_h.proc.send_signal(signal.SIGKILL)
        dst_h.proc.wait(10)
        ev = await wait_event(src, "COLO_EXIT")
        assert ev["data"]["mode"] == "primary"
        await wait_for_status(src, {"completed"}, timeout=30)
        assert (await status_after_failover(src))["last-mode"] == "primary"
        assert (await src.execute("query-status"))["status"] == "running"
        before = max(released(tmp_path / "p.out"))
        await wait_until_async(lambda: max(released(tmp_path / "p.out")) > before + 50)
        assert_one_sequence(released(tmp_path / "p.out"), chained=True)
    finally:
        await disconnect(src, dst)


async def test_mismatches_force_checkpoints_and_outputs_stay_one_sequence(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path, diverge=0.05, delay=20000)
    try:
        stats = await checkpoints(src, 5)
        reasons = {r["reason"]: r["count"] for r in stats["reasons"]}
        assert reasons.get("mismatch", 0) >= 5  # the period (20 s) never came
        assert stats["compare"]["mismatches"] >= 5
        src_h.proc.send_signal(signal.SIGKILL)
        src_h.proc.wait(10)
        await wait_for_status(dst, {"completed"}, timeout=30)
        before = max(released(tmp_path / "p.out"))
        await wait_until_async(lambda: max(released(tmp_path / "p.out", tmp_path / "s.out")) > before + 20)
        assert_one_sequence(released(tmp_path / "p.out", tmp_path / "s.out"), chained=False)
    finally:
        await disconnect(src, dst)


async def test_checkpoint_cut_midway_leaves_the_secondary_on_the_previous_one(start_host, tmp_path):
    """The link breaks 64 KiB into a checkpoint's pages: the secondary never applies it (its cache took the
    pages, RAM and devices did not), takes over from the checkpoint before, and the outputs of both
    survivors stay one chained sequence."""
    from mig_core.testing.proxy import CuttableProxy

    out = "rate=200"
    src_h = start_host(*WORKLOAD, "--output", f"{tmp_path}/p.out,{out}", name="src")
    dst_h = start_host(*WORKLOAD, "--output", f"{tmp_path}/s.out,{out}", "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    proxy = None
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
            await c.execute("migrate-set-parameters", {"x-checkpoint-delay": 300, **PATIENT})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/dst.sock"})
        proxy = CuttableProxy(tmp_path / "proxy.sock", tmp_path / "dst.sock")
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/proxy.sock"})
        await wait_for_status(dst, {"colo"}, timeout=60)
        done = (await checkpoints(src, 2))["checkpoints"]
        proxy.cut_after(64 << 10)  # the next checkpoint carries 300 ms of 8 MiB/s: far more than this
        await wait_for_status(dst, {"completed"}, timeout=30)
        await wait_for_status(src, {"completed"}, timeout=30)
        after = (await src.execute("x-query-colo-stats"))["checkpoints"]
        assert after >= done
        loaded = [e for e in dst_h.log_events() if e.get("event") == "colo_checkpoint_loaded"]
        errors = [e for e in dst_h.log_events() if e.get("event") == "colo_error"]
        assert len(loaded) == after and errors, (len(loaded), after, errors)
        assert "workload_inconsistent" not in dst_h.logs()
        assert (await dst.execute("query-status"))["status"] == "running"
        before = max(released(tmp_path / "p.out", tmp_path / "s.out"))
        await wait_until_async(lambda: max(released(tmp_path / "s.out") or {0: ""}) > before + 20)
        assert_one_sequence(released(tmp_path / "p.out", tmp_path / "s.out"), chained=True)
    finally:
        if proxy is not None:
            proxy.close()
        await disconnect(src, dst)
