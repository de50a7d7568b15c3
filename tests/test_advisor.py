"""The advisor: x-query-migration-advice and ``mig advise`` against real hosts (dirty curve, link probe,
predictions checked against the migration that follows), and the model's rules on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mig_core.engine.advisor import DirtyCurve, Prediction, Situation, predict, recommend
from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status

WL = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "2")
PARAMS = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False,
          "max-cpu-throttle": 99, "throttle-trigger-threshold": 50, "vcpu-dirty-limit": 1,
          "x-vcpu-dirty-limit-period": 1000}


def mig(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, MIG_LOG_LEVEL="warning", COLUMNS="200"))


async def pair(start_host, tmp_path, rate: str, *extra: str):
    src = start_host(*WL, "--dirty-rate", rate, *extra, name="src")
    dst = start_host(*WL, "--dirty-rate", rate, "--incoming", "defer", "-S", name="dst")  # -S: RAM stays put
    s, d = await connect(src.sock), await connect(dst.sock)
    await d.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
    return src, s, d


async def test_advice_predicts_the_migration_that_follows(start_host, tmp_path):
    src, s, d = await pair(start_host, tmp_path, "2M", "--flight-dir", str(tmp_path / "rec"))
    await s.execute("migrate-set-capabilities", {"capabilities": [{"capability": "return-path", "state": True}]})
    await s.execute("migrate-set-parameters", {"max-bandwidth": 8_000_000})
    uri = f"unix:{tmp_path}/m.sock"
    advice = await s.execute("x-query-migration-advice", {"uri": uri, "calc-time": 500})
    assert advice["bandwidth"] == 8_000_000  # max-bandwidth, slower than the probed unix socket
    assert advice["link-bandwidth"] > advice["bandwidth"]
    assert advice["ram-size"] == advice["ram-to-send"] == 32 << 20  # random fill: every page holds data
    # 2 MB/s of distinct pages, whatever the machine: the workload walks a permutation of its pages
    assert 1_000_000 < advice["dirty-rate"] < 3_000_000, advice
    curve = advice["dirty-curve"]
    assert [p["window-ms"] for p in curve] == sorted(p["window-ms"] for p in curve) and len(curve) >= 3
    by = {p["strategy"]: p for p in advice["predictions"]}
    assert set(by) == {"precopy", "auto-converge", "dirty-limit", "postcopy"}
    assert by["precopy"]["converges"] and advice["recommendation"] == "precopy"
    assert not by["postcopy"]["available"]  # postcopy-ram is off
    # the probe left the destination waiting: the migration runs and arrives exact
    await s.execute("migrate", {"uri": uri})
    final = await wait_for_status(s, {"completed", "failed"}, timeout=120)
    assert final["status"] == "completed", final
    await wait_for_status(d, {"completed"})
    assert await ram_digest(s, 32 << 20, tmp_path / "s.bin") == await ram_digest(d, 32 << 20, tmp_path / "d.bin")
    record = await s.execute("x-query-migration-record")
    assert record[0]["kind"] == "start" and record[0]["advice"] == advice
    verdict = record[-1]
    assert verdict["kind"] == "verdict" and verdict["strategy"] == "precopy"
    assert verdict["total-time"] == final["total-time"] and verdict["passes"] == final["ram"]["dirty-sync-count"]
    assert verdict["predicted-total-time"] == by["precopy"]["total-time"]
    # 32 MiB at 8 MB/s is 4.2 s whatever the machine: the prediction is near it (the benchmark holds it to 25 %)
    assert abs(verdict["total-time-error-percent"]) < 50, verdict
    assert [json.loads(line)["kind"] for line in next((tmp_path / "rec").glob("*-source.jsonl")).open()][-1] == \
        "verdict"
    await s.disconnect()
    await d.disconnect()


async def test_advice_refuses_what_it_cannot_measure(start_host, tmp_path):
    src, s, d = await pair(start_host, tmp_path, "1M")
    assert await qmp_error(s.execute("x-query-migration-advice", {"calc-time": 50})) == \
        "Parameter 'calc-time' must be between 200 and 10000 ms"
    assert await qmp_error(s.execute("x-query-migration-advice", {"uri": "exec:cat"})) == \
        "The link probe needs a socket address (tcp, unix, vsock, fd), not 'exec'"
    err = await qmp_error(s.execute("x-query-migration-advice", {"uri": f"unix:{tmp_path}/nobody.sock"}))
    assert err.startswith("The link probe could not connect: ")
    await s.execute("migrate-set-parameters", {"max-bandwidth": 0})
    assert await qmp_error(s.execute("x-query-migration-advice")) == \
        "With max-bandwidth 0 (unlimited) the advisor needs 'uri' to measure the link"
    assert await qmp_error(d.execute("x-query-migration-advice")) == "Guest is waiting for an incoming migration"
    await s.disconnect()
    await d.disconnect()


async def test_probe_leaves_a_multifd_destination_waiting(start_host, tmp_path):
    src = start_host(*WL, "--dirty-rate", "1M", name="src")
    dst = start_host(*WL, "--dirty-rate", "1M", "--incoming", "defer", "-S", name="dst")
    s, d = await connect(src.sock), await connect(dst.sock)
    caps = {"capabilities": [{"capability": "multifd", "state": True}]}
    await s.execute("migrate-set-capabilities", caps)
    await d.execute("migrate-set-capabilities", caps)
    await d.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
    uri = f"unix:{tmp_path}/m.sock"
    for _ in range(2):
        advice = await s.execute("x-query-migration-advice", {"uri": uri, "calc-time": 200})
        assert advice["link-bandwidth"] > 0
    assert (await d.execute("query-migrate"))["status"] == "setup"
    await s.execute("migrate", {"uri": uri})
    assert (await wait_for_status(s, {"completed", "failed"}, timeout=120))["status"] == "completed"
    await wait_for_status(d, {"completed"})
    assert await ram_digest(s, 32 << 20, tmp_path / "s.bin") == await ram_digest(d, 32 << 20, tmp_path / "d.bin")
    await s.disconnect()
    await d.disconnect()


def test_mig_advise_prints_predictions_and_a_recommendation(start_host, tmp_path):
    src = start_host(*WL, "--dirty-rate", "1M", name="src")
    start_host(*WL, "--dirty-rate", "1M", "--incoming", f"unix:{tmp_path}/m.sock", name="dst")
    out = mig("advise", str(src.sock), "--uri", f"unix:{tmp_path}/m.sock", "--calc-time", "300")
    assert out.returncode == 0, out.stderr
    assert "recommendation: precopy" in out.stdout and "link " in out.stdout
    for strategy in ("precopy", "auto-converge", "dirty-limit", "postcopy"):
        assert strategy in out.stdout
    out = mig("advise", str(src.sock), "--json", "--calc-time", "300")
    assert out.returncode == 0 and json.loads(out.stdout)["recommendation"] == "precopy"
    bad = mig("advise", str(src.sock), "--uri", "exec:true")
    assert bad.returncode == 1 and "not 'exec'" in bad.stderr


# -- the model on its own ---------------------------------------------------------------------


def situation(rate: float, bandwidth: float = 100e6, ram: float = 128e6, **params) -> Situation:
    """A program walking its RAM at ``rate`` bytes/s (distinct pages until it has dirtied them all)."""
    curve = DirtyCurve(((0.05, rate * 0.05), (1.0, rate * 1.0)), ram)
    return Situation(ram, curve, bandwidth, 10 * bandwidth, 300.0, 2, {**PARAMS, **params})


def test_dirty_curve_interpolates_and_saturates():
    c = DirtyCurve(((0.1, 10.0), (1.0, 40.0)), 100.0)
    assert c.bytes_in(0.05) == pytest.approx(5.0)
    assert c.bytes_in(0.55) == pytest.approx(25.0)
    assert c.bytes_in(2.0) == pytest.approx(73.333, rel=1e-3)  # the last segment's slope, onwards
    assert c.bytes_in(100.0) == 100.0  # never past the RAM
    assert c.write_rate == pytest.approx(100.0) and c.marginal_rate == pytest.approx(33.333, rel=1e-3)


def test_an_idle_program_switches_over_after_one_pass():
    p = predict(situation(0.0), "precopy")
    assert p.converges and p.passes == 3 and p.total_ms == pytest.approx(1283, abs=5)


def test_precopy_converges_below_the_bandwidth_and_not_at_it():
    slow = predict(situation(20e6), "precopy")
    # 128 MB at 100 MB/s; then the 25.6 MB dirtied meanwhile (the first pass cannot switch over: no estimate
    # yet); the 5.1 MB dirtied in that fit 300 ms and go at the link's 1 GB/s with the machine stopped
    assert slow.converges and slow.passes == 4  # setup's sync, two passes, the switchover's
    assert slow.total_ms == pytest.approx(1282 + 258 + 5 + 3, abs=2) and slow.downtime_ms == pytest.approx(8.2, 0.1)
    fast = predict(situation(100e6), "precopy")
    assert not fast.converges and "downtime-limit" in fast.reason


def test_throttling_converges_where_precopy_does_not():
    auto = predict(situation(100e6), "auto-converge")
    limited = predict(situation(100e6), "dirty-limit")
    assert auto.converges and auto.throttle_pct is not None and auto.throttle_pct >= 20
    assert limited.converges and limited.total_ms is not None and auto.total_ms is not None
    # 2 vCPUs held to 1 MB/s each take hold a period after the trigger; auto-converge needs several steps
    assert limited.total_ms < auto.total_ms
    post = predict(situation(100e6), "postcopy")
    assert post.converges and post.passes == 2


def test_recommendation_prefers_plain_precopy_then_the_fastest_available():
    preds = [predict(situation(100e6), s) for s in ("precopy", "auto-converge", "dirty-limit", "postcopy")]
    choice, why = recommend(preds, {"auto-converge": True, "dirty-limit": True, "postcopy": False})
    assert choice == "dirty-limit" and "does not converge" in why
    choice, _ = recommend(preds, {"auto-converge": True, "dirty-limit": False, "postcopy": False})
    assert choice == "auto-converge"
    choice, why = recommend([Prediction("precopy", False)], {})
    assert choice == "none" and "no strategy" in why
    calm = [predict(situation(1e6), s) for s in ("precopy", "auto-converge")]
    assert recommend(calm, {"auto-converge": True})[0] == "precopy"
