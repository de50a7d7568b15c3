"""Convergence: auto-converge, dirty-limit, calc-dirty-rate, announce, migration threads — real hosts."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from mig_core.testing import connect, qmp_error, vcpu_records, wait_for_status, wait_until

HOST_TRACKER = {"MIG_DIRTY_TRACKER": "host"}


async def wait_rate(client, vcpu: int, ok, tmp: Path, timeout: float = 60.0) -> float:
    """Wait until a vCPU's write rate (MB/s over the last half second or more, from its records) is ``ok``."""
    deadline = time.monotonic() + timeout
    prev, t_prev = await vcpu_records(client, vcpu + 1, tmp / "w0"), time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        now, t_now = await vcpu_records(client, vcpu + 1, tmp / "w1"), time.monotonic()
        mb = (now[vcpu][2] - prev[vcpu][2]) * 4096 / 1e6 / (t_now - t_prev)
        if ok(mb):
            return mb
        assert time.monotonic() < deadline, f"vCPU {vcpu} writes {mb:.1f} MB/s"
        prev, t_prev = now, t_now


async def measure(client, args: dict, tmp: Path) -> tuple[dict, list[float]]:
    """Run calc-dirty-rate; return the reply and each vCPU's true rate (MiB/s) from its own records."""
    r0 = await vcpu_records(client, 2, tmp / "r0")
    t0 = time.monotonic()
    await client.execute("calc-dirty-rate", args)
    unit = {"calc-time-unit": args["calc-time-unit"]} if "calc-time-unit" in args else {}
    while (q := await client.execute("query-dirty-rate", unit))["status"] != "measured":
        await asyncio.sleep(0.05)
    r1 = await vcpu_records(client, 2, tmp / "r1")
    elapsed = time.monotonic() - t0
    return q, [(b[2] - a[2]) * 4096 / (1 << 20) / elapsed for a, b in zip(r0, r1, strict=True)]


@pytest.mark.parametrize("mode", ["page-sampling", "dirty-bitmap", "dirty-ring"])
async def test_calc_dirty_rate_matches_the_workload(start_host, tmp_path, mode):
    h = start_host("--ram", "256M", "--vcpus", "2", "--dirty-rate", "8M,24M", env=HOST_TRACKER)
    c = await connect(h.sock)
    try:
        # two seconds: the truth is read over the window plus the queries around it, and on a busy machine
        # the vCPUs' rate drifts; the longer window keeps that edge small beside what is measured
        args = {"calc-time": 2, "mode": mode} if mode != "page-sampling" else {"calc-time": 2000,
                                                                               "calc-time-unit": "millisecond",
                                                                               "sample-pages": 4096}
        q, truth = await measure(c, args, tmp_path)
        assert q["status"] == "measured" and q["mode"] == mode
        assert abs(q["dirty-rate"] - sum(truth)) <= 0.2 * sum(truth), (q, truth)
        if mode == "dirty-ring":
            rates = {v["id"]: v["dirty-rate"] for v in q["vcpu-dirty-rate"]}
            for i, t in enumerate(truth):  # each vCPU's own rate, 8 and 24 MiB/s
                assert abs(rates[i] - t) <= 0.2 * t, (rates, truth)
            assert q["sample-pages"] == 0
        else:
            assert "vcpu-dirty-rate" not in q
        if mode == "page-sampling":
            assert q["calc-time-unit"] == "millisecond" and 2000 <= q["calc-time"] < 2100
    finally:
        await c.disconnect()


async def test_calc_dirty_rate_errors(start_host):
    h = start_host("--ram", "64M")  # uffd-wp tracker: no per-vCPU attribution
    c = await connect(h.sock)
    try:
        assert await c.execute("query-dirty-rate") == {
            "status": "unstarted", "start-time": 0, "calc-time": 0, "calc-time-unit": "second", "sample-pages": 0,
            "mode": "page-sampling"}
        cases = [
            ({"calc-time": 0}, "Calculation time is out of range [50ms, 60000ms]."),
            ({"calc-time": 49, "calc-time-unit": "millisecond"}, "Calculation time is out of range [50ms, 60000ms]."),
            ({"calc-time": 61}, "Calculation time is out of range [50ms, 60000ms]."),
            ({"calc-time": 1, "sample-pages": 100}, "sample-pages is out of range[128, 16384]."),
            ({"calc-time": 1, "sample-pages": 512, "mode": "dirty-bitmap"},
             "sample-pages is used only in page-sampling mode"),
            ({"calc-time": 1, "mode": "dirty-ring"}, "mode dirty-ring is not enabled, use other method instead."),
            ({"calc-time": "1"}, "Invalid parameter type for 'calc-time', expected: integer"),
        ]
        for args, text in cases:
            assert await qmp_error(c.execute("calc-dirty-rate", args)) == text
        await c.execute("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"})
        assert await qmp_error(c.execute("calc-dirty-rate", {"calc-time": 1})) == (
            "the dirty rate is already being measured.")
        assert (await c.execute("query-dirty-rate"))["status"] == "measuring"
        names = [t["name"] for t in await c.execute("query-migrationthreads")]
        assert "get_dirty_rate" in names
    finally:
        await c.disconnect()


async def test_vcpu_dirty_limit(start_host, tmp_path):
    plain = start_host("--ram", "64M", name="plain")
    c = await connect(plain.sock)
    assert await qmp_error(c.execute("set-vcpu-dirty-limit", {"dirty-rate": 5})) == (
        "dirty page limit requires per-vCPU dirty page attribution "
        "(the 'host' dirty tracker or vCPU threads that report their writes); mig run gets it with "
        "--dirty-tracker host")
    await c.execute("cancel-vcpu-dirty-limit")  # nothing to cancel: silently fine, as QEMU
    await c.disconnect()

    h = start_host("--ram", "256M", "--vcpus", "2", "--dirty-rate", "16M,16M", env=HOST_TRACKER, name="limited")
    c = await connect(h.sock)
    try:
        assert await qmp_error(c.execute("set-vcpu-dirty-limit", {"cpu-index": 7, "dirty-rate": 5})) == (
            "incorrect cpu index specified")
        await c.execute("set-vcpu-dirty-limit", {"cpu-index": 1, "dirty-rate": 4})
        limits = await c.execute("query-vcpu-dirty-limit")
        assert [(x["cpu-index"], x["limit-rate"]) for x in limits] == [(1, 4)]
        # wait for the controller to bring the measured rate down (a state, not a time)
        await wait_rate(c, 1, lambda mb: mb <= 5, tmp_path)
        # then, over a window, it stays held: a slower machine only writes less, never more
        r0 = await vcpu_records(c, 2, tmp_path / "a")
        t0 = time.monotonic()
        await asyncio.sleep(2)
        r1 = await vcpu_records(c, 2, tmp_path / "b")
        dt = time.monotonic() - t0
        mb = [(b[2] - a[2]) * 4096 / 1e6 / dt for a, b in zip(r0, r1, strict=True)]
        assert mb[1] <= 4 * 1.25, mb  # held to its quota
        await c.execute("cancel-vcpu-dirty-limit", {"cpu-index": 1})
        assert await c.execute("query-vcpu-dirty-limit") == []
        await wait_rate(c, 1, lambda mb: mb > 8, tmp_path)  # unthrottled again: well above the old quota
    finally:
        await c.disconnect()


# --- migrations that need help to converge --------------------------------------------------

BUSY = ("--ram", "8M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "64M")
SLOW = {"max-bandwidth": 16 << 20, "downtime-limit": 20}


async def busy_pair(start_host, tmp_path, caps, env=None):
    s = start_host(*BUSY, name="src", env=env)
    d = start_host(*BUSY, "--incoming", "defer", name="dst", env=env)
    src, dst = await connect(s.sock), await connect(d.sock)
    if caps:
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": x, "state": True}
                                                                        for x in caps]})
    await src.execute("migrate-set-parameters", SLOW)
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/c.sock", "exit-on-error": False})
    return s, d, src, dst


async def test_busy_workload_does_not_converge_alone(start_host, tmp_path):
    s, d, src, dst = await busy_pair(start_host, tmp_path, [])
    try:
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/c.sock"})
        await wait_for_status(src, {"active"})
        while True:
            info = await src.execute("query-migrate")
            assert info["status"] == "active", info
            if info["ram"]["dirty-sync-count"] > 10:
                break
            await asyncio.sleep(0.1)
        # after 10 passes far more is dirty than fits 20 ms at 16 MiB/s
        assert info["ram"]["remaining"] > (16 << 20) * 0.020, info
        threads = await src.execute("query-migrationthreads")
        (main,) = [t for t in threads if t["name"] == "live_migration"]
        assert os.path.isdir(f"/proc/{s.proc.pid}/task/{main['thread-id']}")
        await src.execute("migrate_cancel")
        await wait_for_status(src, {"cancelled"})
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_auto_converge_follows_the_parameters(start_host, tmp_path):
    s, d, src, dst = await busy_pair(start_host, tmp_path, ["auto-converge"])
    await src.execute("migrate-set-parameters", {"cpu-throttle-initial": 60, "cpu-throttle-increment": 20,
                                                 "max-cpu-throttle": 95, "throttle-trigger-threshold": 50})
    try:
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/c.sock"})
        seen = set()
        while (info := await src.execute("query-migrate"))["status"] in ("setup", "active"):
            if "cpu-throttle-percentage" in info:
                seen.add(info["cpu-throttle-percentage"])
            await asyncio.sleep(0.05)
        info = await wait_for_status(src, {"completed", "failed"})
        assert info["status"] == "completed", info
        assert "cpu-throttle-percentage" not in info  # throttling ended with the migration
        steps = [e["percentage"] for e in s.log_events() if e.get("event") == "throttle_step"]
        assert steps and steps == [60, 80, 95, 95, 95][: len(steps)], steps  # initial, +increment, capped
        assert seen <= set(steps)
        await wait_for_status(dst, {"completed"})
        await src.execute("cont")  # the source at full speed again: above what 95 % throttling allows
        assert "cpu-throttle-percentage" not in await src.execute("query-migrate")
        await wait_rate(src, 0, lambda mb: mb > 8, tmp_path)
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_dirty_limit_migration(start_host, tmp_path):
    s, d, src, dst = await busy_pair(start_host, tmp_path, ["dirty-limit"], env=HOST_TRACKER)
    await src.execute("migrate-set-parameters", {"vcpu-dirty-limit": 1, "x-vcpu-dirty-limit-period": 500})
    # an operator's own limit from before the migration
    await src.execute("set-vcpu-dirty-limit", {"cpu-index": 1, "dirty-rate": 300})
    try:
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/c.sock"})
        limited = False
        while (info := await src.execute("query-migrate"))["status"] in ("setup", "active"):
            if "dirty-limit-throttle-time-per-round" in info:
                limited = True
                assert await qmp_error(src.execute("set-vcpu-dirty-limit", {"dirty-rate": 5})) == (
                    "can't set dirty page rate limit while migration is running")
            await asyncio.sleep(0.05)
        info = await wait_for_status(src, {"completed", "failed"})
        assert info["status"] == "completed", info
        assert limited
        assert any(e.get("event") == "dirty_limit_applied" for e in s.log_events())
        # the migration's limits are gone, the operator's is back
        limits = await src.execute("query-vcpu-dirty-limit")
        assert [(x["cpu-index"], x["limit-rate"]) for x in limits] == [(1, 300)]
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_announce_schedule(start_host, tmp_path):
    site = tmp_path / "site"
    info = site / "announce_rec-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: announce-rec\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mig_core.hooks]\nrec = announce_rec\n")
    (site / "announce_rec.py").write_text(
        "import os, time\nfrom mig_core.plugin.hookspecs import hookimpl\n"
        "@hookimpl\ndef mig_announce(round, rounds):\n"
        "    with open(os.environ['ANNOUNCE_LOG'], 'a') as f:\n"
        "        f.write(f'{time.monotonic()} {round} {rounds}\\n')\n"
        "@hookimpl\ndef mig_switchover(migration_id, side):\n"
        "    with open(os.environ['ANNOUNCE_LOG'], 'a') as f:\n"
        "        f.write(f'{time.monotonic()} 0 {side.value}\\n')\n")
    log = tmp_path / "announce.log"
    env = {"PYTHONPATH": str(site), "ANNOUNCE_LOG": str(log)}
    s = start_host("--ram", "8M", name="src")
    d = start_host("--ram", "8M", "--incoming", "defer", name="dst", env=env)
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        await dst.execute("migrate-set-parameters", {"announce-initial": 100, "announce-step": 50,
                                                     "announce-max": 250, "announce-rounds": 5})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/a.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/a.sock"})
        await wait_for_status(dst, {"completed"})
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 6, timeout=60)
        rows = [line.split() for line in log.read_text().splitlines()]
        start = float(rows[0][0])  # the destination's switchover
        assert rows[0][1:] == ["0", "destination"]
        rounds = [(float(t) - start) * 1000 for t, r, _ in rows[1:]]
        assert [r for _, r, _ in rows[1:]] == ["1", "2", "3", "4", "5"]
        expected = [100, 250, 450, 700, 950]  # delays 100, 150, 200, 250 (capped), 250
        # timers never fire early, so each round comes at its time or after it; each gap is at least
        # the step (a busy machine only stretches them)
        for got, want in zip(rounds, expected, strict=True):
            assert got >= want - 5, (rounds, expected)
        gaps = [b - a for a, b in zip(rounds, rounds[1:])]
        for got, want in zip(gaps, [150, 200, 250, 250], strict=True):
            assert got >= want - 5, (gaps, rounds)
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("multifd", [False, True], ids=["main-stream", "multifd"])
async def test_light_workload_switches_over_after_the_second_pass(start_host, tmp_path, multifd):
    """Four vCPUs writing a heartbeat every millisecond leave a page or two dirty after every pass: the
    second pass's rate must serve as the estimate, not a wait for a pass that finds nothing dirty."""
    light = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "4", "--dirty-rate", "1M")
    s = start_host(*light, name="src")
    d = start_host(*light, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        caps = [{"capability": c, "state": True} for c in ("return-path", *(["multifd"] if multifd else []))]
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": caps})
            await c.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=30)
        assert info["status"] == "completed", info
        # syncs: setup, after the first pass, after the second (the estimate), the final one with vCPUs stopped
        assert info["ram"]["dirty-sync-count"] <= 5, info["ram"]
        await wait_for_status(dst, {"completed"})
    finally:
        await src.disconnect()
        await dst.disconnect()


def test_throttle_time_per_round_is_measured():
    """A vCPU throttled to 99 % plans a 990 ms sleep; a stop cuts it short, and the figure reported is
    the sleep it really took, not the planned one."""
    import threading

    from mig_core.engine.dirtylimit import DirtyLimiter
    from mig_core.machine.machine import Machine

    m = Machine()
    m.add_ram("ram0", 1 << 20)
    m.host_marks_writes = True
    m.tracker_name = "host"
    stop = threading.Event()
    seen = threading.Event()

    def body(v):
        while not stop.is_set():
            seen.set()
            v.safe_point()

    threads = m.vcpus.run(body, 1)
    try:
        seen.wait(30)
        limiter = DirtyLimiter(m)
        limiter.quota[0] = 1
        m.vcpus.set_vcpu_throttle(0, 99)
        (v,) = m.vcpus.vcpus
        # wait for a throttle round to be under way, then stop the machine: the sleep ends at once
        deadline = __import__("time").monotonic() + 30
        while v.throttle_rounds == 0 and __import__("time").monotonic() < deadline:
            m.vcpus.hold()  # wakes the sleep; resume right after so the vCPU keeps running
            m.vcpus.resume_all()
        assert v.throttle_rounds > 0
        measured = limiter.throttle_time_per_round_us()
        assert measured == int(v.last_throttle_sleep * 1e6)
        assert 0 < measured < 990_000  # the plan was 0.99 / 0.01 x 10 ms
    finally:
        stop.set()
        m.vcpus.set_vcpu_throttle(0, 0)
        m.vcpus.resume_all()
        for t in threads:
            t.join(10)
        m.close()
