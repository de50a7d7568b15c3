"""COLO's commands and rules between real ``mig run`` hosts: QEMU's errors outside COLO, what cannot be
combined, a destination without x-colo, cancel, x-checkpoint-delay, the heartbeat watchdog, and failover
left to the operator (x-colo-heartbeat-timeout 0, as QEMU)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from mig_colo.testing import (
    WORKLOAD,
    assert_one_sequence,
    checkpoints,
    colo_pair,
    disconnect,
    released,
    status_after_failover,
    wait_event,
)

from mig_core.testing import connect, qmp_error, wait_for_status


async def test_commands_outside_colo_answer_as_qemu(qmp):
    assert await qmp.execute("query-colo-status") == {"mode": "none", "last-mode": "none", "reason": "none"}
    assert await qmp_error(qmp.execute("x-colo-lost-heartbeat")) == "VM is not in COLO mode"
    assert await qmp_error(qmp.execute("xen-colo-do-checkpoint")) == "VM is not in COLO mode"
    assert await qmp_error(qmp.execute("xen-set-replication", {"enable": True, "primary": True,
                                                               "failover": True})) == \
        "Parameter 'failover' is only for stopping replication"
    assert await qmp_error(qmp.execute("xen-set-replication", {"enable": False, "primary": True})) == \
        "VM is not in COLO mode"
    assert await qmp.execute("query-xen-replication-status") == {"error": False}
    stats = await qmp.execute("x-query-colo-stats")
    assert stats["mode"] == "none" and stats["checkpoints"] == 0 and "compare" not in stats
    assert await qmp_error(qmp.execute("migrate-set-parameters", {"x-colo-heartbeat-timeout": 60001})) == \
        "Parameter 'x-colo-heartbeat-timeout' expects a value between 0 and 60000"
    assert await qmp_error(qmp.execute("migrate-set-parameters", {"x-colo-compare-limit": 0})) == \
        "Parameter 'x-colo-compare-limit' expects a value between 1 and 1048576"


@pytest.mark.parametrize("other", ["multifd", "postcopy-ram", "x-checksums"])
async def test_x_colo_refuses_what_it_cannot_carry(qmp, tmp_path, other):
    await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True},
                                                                    {"capability": other, "state": True}]})
    assert await qmp_error(qmp.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})) == \
        f"mig cannot combine x-colo with {other} yet"
    assert (await qmp.execute("query-migrate")) == {}


async def test_destination_without_x_colo_refuses_the_stream(start_host, tmp_path):
    src_h = start_host(*WORKLOAD, name="src")
    dst_h = start_host(*WORKLOAD, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-colo", "state": True}]})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/colo.sock", "exit-on-error": False})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/colo.sock"})
        info = await wait_for_status(dst, {"failed"})
        assert "ENABLE_COLO command come in migration stream, but x-colo capability is not set" in info["error-desc"]
        await wait_for_status(src, {"failed"})
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await disconnect(src, dst)


async def test_cancel_ends_colo_and_the_secondary_does_not_take_over(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path)
    try:
        await checkpoints(src, 1)
        await src.execute("migrate_cancel")
        await wait_for_status(src, {"cancelled"})
        assert (await src.execute("query-status"))["status"] == "running"
        info = await wait_for_status(dst, {"failed"})
        assert "the primary ended replication (migrate_cancel)" in info["error-desc"]
        assert (await dst.execute("query-status"))["status"] == "paused"
        ev = await wait_event(dst, "COLO_EXIT")
        assert ev["data"] == {"mode": "secondary", "reason": "error"}
        assert await dst.execute("query-xen-replication-status") == {
            "error": True, "desc": "COLO: the primary ended replication (migrate_cancel); this side stays stopped"}
        assert_one_sequence(released(tmp_path / "p.out", tmp_path / "s.out"), chained=True)
    finally:
        await disconnect(src, dst)


async def test_setting_the_delay_or_asking_checkpoints_now(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path, delay=3600000)
    try:
        await src.execute("migrate-set-parameters", {"x-checkpoint-delay": 3600000})  # QEMU: a checkpoint now
        await checkpoints(src, 1)
        await src.execute("xen-colo-do-checkpoint")
        stats = await checkpoints(src, 2)
        assert stats["reasons"] == [{"reason": "request", "count": 2}]
        assert await qmp_error(dst.execute("xen-colo-do-checkpoint")) == \
            "COLO checkpoints are driven by the primary; this side is the secondary"
        assert await qmp_error(dst.execute("xen-set-replication", {"enable": True, "primary": True})) == \
            "COLO runs here as secondary, not primary"
        await dst.execute("xen-set-replication", {"enable": True, "primary": False})
        assert await qmp_error(src.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-colo", "state": False}]})) == "There's a migration process in progress"
    finally:
        await disconnect(src, dst)


async def test_a_hung_secondary_is_failed_over_by_the_heartbeat(start_host, tmp_path):
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path, params={"x-colo-heartbeat-timeout": 1000})
    try:
        await checkpoints(src, 1)
        dst_h.proc.send_signal(signal.SIGSTOP)
        ev = await wait_event(src, "COLO_EXIT")
        assert ev["data"] == {"mode": "primary", "reason": "request"}  # the watchdog asked, as an operator would
        await wait_for_status(src, {"completed"})
        assert "colo_automatic_failover" in src_h.logs()
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        dst_h.proc.send_signal(signal.SIGKILL)
        await disconnect(src, dst)


async def test_without_automatic_failover_the_operator_decides(start_host, tmp_path):
    """x-colo-heartbeat-timeout 0: a lost secondary ends the loop with COLO_EXIT(error) and the primary
    waits in colo, as QEMU does, until x-colo-lost-heartbeat."""
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path, params={"x-colo-heartbeat-timeout": 0})
    try:
        await checkpoints(src, 1)
        dst_h.proc.send_signal(signal.SIGKILL)
        ev = await wait_event(src, "COLO_EXIT")
        assert ev["data"] == {"mode": "primary", "reason": "error"}
        assert (await src.execute("query-migrate"))["status"] == "colo"
        assert (await src.execute("query-colo-status"))["reason"] == "none"
        await src.execute("x-colo-lost-heartbeat")
        await wait_for_status(src, {"completed"})
        assert await status_after_failover(src) == {"mode": "none", "last-mode": "primary", "reason": "request"}
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await disconnect(src, dst)


async def test_a_full_comparison_queue_forces_a_checkpoint(start_host, tmp_path):
    """x-colo-compare-limit 20: with the secondary stopped (SIGSTOP, within the heartbeat's patience) the
    primary's held messages reach the bound; that asks for a checkpoint, which completes once the secondary
    runs again, and releases them."""
    src_h, dst_h, src, dst = await colo_pair(start_host, tmp_path, delay=3600000, params={"x-colo-compare-limit": 20})
    try:
        dst_h.proc.send_signal(signal.SIGSTOP)
        stats = await src.execute("x-query-colo-stats")
        while stats["compare"]["queue-depth"] < 20:
            await asyncio.sleep(0.02)
            stats = await src.execute("x-query-colo-stats")
        assert stats["compare"]["queue-limit"] == 20
        dst_h.proc.send_signal(signal.SIGCONT)
        stats = await checkpoints(src, 1)
        assert {r["reason"]: r["count"] for r in stats["reasons"]}.get("queue-full", 0) >= 1
        assert stats["compare"]["queue-full"] >= 1 and stats["compare"]["max-queue-depth"] >= 20
        assert_one_sequence(released(tmp_path / "p.out"), chained=True)
    finally:
        dst_h.proc.send_signal(signal.SIGCONT)
        await disconnect(src, dst)
