"""The flight recorder: every pass and every second of a migration on both sides, over QMP
(``x-query-migration-record``) and as JSON lines (``mig run --flight-dir``), agreeing with query-migrate."""

from __future__ import annotations

import json

from mig_core.testing import connect, wait_for_status

WL = ("--ram", "32M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "1M")


def lines(directory, side: str) -> list[dict]:
    [path] = directory.glob(f"*-{side}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_migration_is_recorded_pass_by_pass_on_both_sides(start_host, tmp_path):
    src = await connect(start_host(*WL, "--flight-dir", str(tmp_path / "src-rec"), name="src").sock)
    dst = await connect(start_host(*WL, "--incoming", "defer", "--flight-dir", str(tmp_path / "dst-rec"),
                                   name="dst").sock)
    assert await src.execute("x-query-migration-record") == []
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    (sa,) = (await dst.execute("query-migrate"))["socket-address"]
    # at most 8 MiB/s: the 16 MiB of data take two seconds at least, so per-second records exist on any machine
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20, "downtime-limit": 100})
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{sa['port']}"})
    final = await wait_for_status(src, {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    await wait_for_status(dst, {"completed"})
    record = await src.execute("x-query-migration-record")
    assert record == lines(tmp_path / "src-rec", "source")  # the ring and the file hold the same records
    kinds = [r["kind"] for r in record]
    assert [r["status"] for r in record if r["kind"] == "status"] == ["setup", "active", "device", "completed"]
    passes = [r for r in record if r["kind"] == "pass"]
    assert [p["pass"] for p in passes] == list(range(1, final["ram"]["dirty-sync-count"] + 1))
    assert all(p["dirty-bytes"] >= 0 and "transferred" in p for p in passes[1:])
    assert kinds.count("second") >= 1
    seconds = [r for r in record if r["kind"] == "second"]
    assert all(a["transferred"] <= b["transferred"] for a, b in zip(seconds, seconds[1:], strict=False))
    end = record[-1]
    assert end["kind"] == "end"
    for key in ("transferred", "total", "dirty-sync-count", "normal", "duplicate"):
        assert end[key] == final["ram"][key], key  # the last record is query-migrate's final word
    assert end["downtime"] == final["downtime"] and end["total-time"] == final["total-time"]
    assert all(a["ms"] <= b["ms"] for a, b in zip(record, record[1:], strict=False))
    drec = await dst.execute("x-query-migration-record")
    assert [r["status"] for r in drec if r["kind"] == "status"] == ["setup", "active", "completed"]
    assert drec == lines(tmp_path / "dst-rec", "destination")
    await src.disconnect()
    await dst.disconnect()


async def test_a_failed_migration_records_its_error(start_host, tmp_path):
    src = await connect(start_host(*WL, name="src").sock)
    await src.execute("migrate", {"uri": "exec:exit 3"})
    final = await wait_for_status(src, {"failed", "completed"})
    assert final["status"] == "failed"
    record = await src.execute("x-query-migration-record")
    assert [r["status"] for r in record if r["kind"] == "status"][-1] == "failed"
    assert record[-1]["kind"] == "end" and record[-1]["error-desc"] == final["error-desc"]
