"""The autopilot: a workload that dirties twice as fast as max-bandwidth never converges alone, and does
under the autopilot — by postcopy, by a dirty limit, or by auto-converge, whichever the hosts allow."""

from __future__ import annotations

import asyncio
import contextlib
import time

from qemu.qmp import EventListener

from mig_core.engine.autopilot import AutopilotPolicy
from mig_core.testing import connect, qmp_error, wait_for_status

# 8 MB/s of distinct pages (two vCPUs) against 4 MB/s of bandwidth: every pass finds all 4 MiB dirty again
WL = ("--ram", "4M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "4000000,4000000")
#: the dirty-limit case keeps 8 MiB: with 4 MiB its migration took 46 s against 15 s (measured; the slower
#: convergence of a dirty limit on so small a RAM is noted in the issue, not investigated here)
WL_LIMITED = ("--ram", "8M", *WL[2:])
BANDWIDTH = 4_000_000


def on(*caps: str) -> dict:
    return {"capabilities": [{"capability": c, "state": True} for c in caps]}


async def start(start_host, tmp_path, caps: tuple[str, ...] = (), env: dict | None = None,
                workload: tuple[str, ...] = WL):
    src_h = start_host(*workload, name="src", env=env)
    dst_h = start_host(*workload, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock), await connect(dst_h.sock)
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", on("events", *caps))
    await src.execute("migrate-set-parameters", {"max-bandwidth": BANDWIDTH, "downtime-limit": 100})
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
    return src, dst


async def close(*clients) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            await c.disconnect()


async def test_without_the_autopilot_it_does_not_converge_with_it_it_switches_to_postcopy(start_host, tmp_path):
    src, dst = await start(start_host, tmp_path, ("postcopy-ram",))
    assert await src.execute("x-query-migration-autopilot") == {
        "enabled": False, "stalled-passes": 3, "deadline": 0, "decisions": []}
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    # six passes without the autopilot (twice the default stalled-passes): remaining never falls, nothing
    # steps in
    deadline = time.monotonic() + 180
    while True:
        info = await src.execute("query-migrate")
        if info["status"] not in ("setup", "active") or info.get("ram", {}).get("dirty-sync-count", 0) >= 6:
            break
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.1)
    assert info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 6, info
    assert info["ram"]["remaining"] > 2 << 20  # more than half the RAM still to send, pass after pass
    assert (await src.execute("x-query-migration-autopilot"))["decisions"] == []
    await src.execute("migrate_cancel")
    assert (await wait_for_status(src, {"cancelled"}))["status"] == "cancelled"
    await close(src, dst)

    # the same with the autopilot on: after two stalled passes it starts postcopy, and the migration ends
    src, dst = await start(start_host, tmp_path, ("postcopy-ram",))
    listener = EventListener("MIG_AUTOPILOT")
    src.register_listener(listener)
    await src.execute("x-set-migration-autopilot", {"enabled": True, "stalled-passes": 2})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=120)
    assert final["status"] == "completed", final
    await wait_for_status(dst, {"completed"}, timeout=60)
    [decision] = (await src.execute("x-query-migration-autopilot"))["decisions"]
    assert decision["action"] == "postcopy" and decision["applied"] == "migrate-start-postcopy"
    assert "has not fallen for 2 passes" in decision["reason"]
    [event] = listener.clear()
    assert event["data"] == decision
    record = await src.execute("x-query-migration-record")
    [line] = [r for r in record if r["kind"] == "autopilot"]
    assert line["action"] == "postcopy" and line["pass"] == decision["pass"]
    assert "postcopy-active" in [r.get("status") for r in record if r["kind"] == "status"]
    await close(src, dst)


async def test_the_autopilot_applies_a_dirty_limit_where_vcpus_are_attributed(start_host, tmp_path):
    src, dst = await start(start_host, tmp_path, env={"MIG_DIRTY_TRACKER": "host"}, workload=WL_LIMITED)
    await src.execute("migrate-set-parameters", {"vcpu-dirty-limit": 1})  # 2 vCPUs: 2 MB/s, half the bandwidth
    await src.execute("x-set-migration-autopilot", {"enabled": True, "stalled-passes": 2})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=180)
    assert final["status"] == "completed", final
    decisions = (await src.execute("x-query-migration-autopilot"))["decisions"]
    assert decisions and decisions[0]["action"] == "dirty-limit" and decisions[0]["applied"] == "dirty-limit 1 MB/s"
    # the limits it applied went with the migration
    assert all(v["limit-rate"] == 0 for v in await src.execute("query-vcpu-dirty-limit")) or \
        await src.execute("query-vcpu-dirty-limit") == []
    await close(src, dst)


async def test_the_autopilot_steps_auto_converge_otherwise(start_host, tmp_path):
    src, dst = await start(start_host, tmp_path)
    await src.execute("migrate-set-parameters", {"cpu-throttle-initial": 70})
    await src.execute("x-set-migration-autopilot", {"enabled": True, "stalled-passes": 2})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=180)
    assert final["status"] == "completed", final
    decisions = (await src.execute("x-query-migration-autopilot"))["decisions"]
    assert decisions and decisions[0]["action"] == "auto-converge"
    assert decisions[0]["applied"] == "cpu-throttle 70 %"
    assert "cpu-throttle-percentage" not in await src.execute("query-migrate")  # full speed again
    await close(src, dst)


async def test_autopilot_settings_are_checked(start_host, tmp_path):
    src = await connect(start_host(*WL, name="src").sock)
    assert await qmp_error(src.execute("x-set-migration-autopilot", {"enabled": True, "stalled-passes": 0})) == \
        "Parameter 'stalled-passes' expects a value between 1 and 100"
    assert await qmp_error(src.execute("x-set-migration-autopilot", {"enabled": True, "deadline": -1})) == \
        "Parameter 'deadline' expects a value of 0 (none) or more ms"
    await src.execute("x-set-migration-autopilot", {"enabled": True, "deadline": 5000})
    await src.execute("x-set-migration-autopilot", {"enabled": False})  # the rest is kept
    assert await src.execute("x-query-migration-autopilot") == {
        "enabled": False, "stalled-passes": 3, "deadline": 5000, "decisions": []}
    await close(src)


async def test_the_autopilot_acts_at_once_on_advice_that_says_it_will_not_converge(start_host, tmp_path):
    src, dst = await start(start_host, tmp_path, ("postcopy-ram",))
    advice = await src.execute("x-query-migration-advice", {"uri": f"unix:{tmp_path}/m.sock", "calc-time": 500})
    [plain] = [p for p in advice["predictions"] if p["strategy"] == "precopy"]
    assert not plain["converges"] and advice["recommendation"] == "postcopy"
    # so many stalled passes would never come: the advice alone makes it act, at the first pass it can
    await src.execute("x-set-migration-autopilot", {"enabled": True, "stalled-passes": 100})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=120)
    assert final["status"] == "completed", final
    [decision] = (await src.execute("x-query-migration-autopilot"))["decisions"]
    assert decision == {"pass": 2, "action": "postcopy", "applied": "migrate-start-postcopy",
                        "reason": "the advice predicted it would not converge"}
    await wait_for_status(dst, {"completed"}, timeout=60)
    await close(src, dst)


def test_policy_counts_stalled_passes_and_deadlines():
    p = AutopilotPolicy(stalled_passes=2, deadline_ms=0)
    assert p.observe(1, 100, 0) is None  # the setup's sync
    assert p.observe(2, 80, 1000) is None  # the best so far
    assert p.observe(3, 79, 2000) is None  # under 5 % better: stalled 1
    assert p.observe(4, 90, 3000) == "remaining has not fallen for 2 passes (0.0 MB left)"
    assert p.observe(5, 70, 4000) is None  # progress resets the count
    assert p.observe(6, 70, 5000) is None
    assert p.observe(7, 70, 6000) is not None
    late = AutopilotPolicy(stalled_passes=50, deadline_ms=3000)
    assert late.observe(2, 100, 2000) is None and late.observe(3, 50, 2900) is None
    assert late.observe(4, 25, 3100) == "still running after 3.1 s, past the deadline of 3.0 s"
    assert late.observe(5, 10, 4000) is None  # once
    late.start(predicted_ms=9000)
    assert late.observe(2, 100, 100) == "the advice predicted 9.0 s, past the deadline of 3.0 s"
    late.start(predicted_ms=2000)
    assert late.observe(2, 100, 100) is None
