"""``mig run`` as the reference host: memory at scale, stale destinations, the dirty tracker option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status


def _status_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(key)


def _peak_rss_over_ram(start_host, size: str, ram: int) -> int:
    h = start_host("--ram", size, "--ram-fill", "random", name="big")
    # listening means the fill is done; the high-water mark covers everything the fill allocated
    return _status_kib(h.proc.pid, "VmHWM") * 1024 - ram


def test_filling_ram_costs_no_temporary_copy(start_host):
    """The peak RSS of a 2 GiB random host exceeds its RAM by a fixed amount, not by a second copy."""
    over = _peak_rss_over_ram(start_host, "2G", 2 << 30)
    assert over < 256 << 20, f"peak RSS is RAM + {over >> 20} MiB"


@pytest.mark.scale
def test_8g_host_stays_within_5_percent_of_its_ram(start_host):
    """`make scale`: mig run --ram 8G --ram-fill random, peak RSS <= 1.05 x RAM."""
    ram = 8 << 30
    over = _peak_rss_over_ram(start_host, "8G", ram)
    assert ram + over <= 1.05 * ram, f"peak RSS {(ram + over) / ram:.3f} x RAM"


async def test_destination_with_stale_contents_ends_exact(start_host, tmp_path):
    """--ram-fill on a destination: the stale pages the source does not send are dropped."""
    s = start_host("--ram", "16M", "--ram-fill", "half", name="src")
    d = start_host("--ram", "16M", "--ram-fill", "random", "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        stale = await ram_digest(dst, 16 << 20, tmp_path / "stale")
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        await wait_for_status(dst, {"completed"})
        moved = await ram_digest(dst, 16 << 20, tmp_path / "d")
        assert moved != stale and moved == await ram_digest(src, 16 << 20, tmp_path / "s")
        # the source named its never-touched half (UNPOPULATED): all of it held random data here and went,
        # read while the stream loaded or at the end; nothing else was read
        ev = next(e for e in d.log_events() if e.get("event") == "held_pages_dropped")
        assert ev["dropped"] == ev["read_while_loading"] + ev["read_at_end"] == 2048, ev
        assert any(e.get("event") == "held_pages_scan_started" and e.get("pages") == 2048
                   for e in d.log_events())
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("dst_fill", ["zero", "random"])
async def test_a_preallocated_destination_reads_only_what_was_written_in_it(start_host, tmp_path, dst_fill):
    """--mem-prealloc --incoming: a write witness watches the fresh RAM, so the load knows which pages may
    hold data without reading them: none when nothing wrote them, every page after --ram-fill."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off here: the witness watches huge mappings only")
    s = start_host("--ram", "64M", "--ram-fill", "half", name="src")
    d = start_host("--ram", "64M", "--mem-prealloc", "--ram-fill", dst_fill, "--incoming", "defer", "-S",
                   name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(dst, 64 << 20, tmp_path / "d") == await ram_digest(src, 64 << 20, tmp_path / "s")
        events = d.log_events()
        witness = next(e for e in events if e.get("event") == "write_witness")
        if not witness["watched"] and witness.get("why_not") == "not mapped with huge pages":
            pytest.skip("the kernel gave the destination few huge pages (memory fragmented): nothing watched")
        assert witness["watched"], witness
        ev = next(e for e in events if e.get("event") == "held_pages_dropped")
        never_sent = 64 << 20 >> 13  # the source's untouched half, in 4 KiB pages
        expect = 0 if dst_fill == "zero" else never_sent
        assert ev["read_while_loading"] + ev["read_at_end"] == ev["dropped"] == expect, ev
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_dirty_tracker_option(start_host, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{tmp_path}/x.sock",
                          "--dirty-tracker", "bogus"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown dirty tracker 'bogus' (installed: hash, host, uffd-wp)" in out.stderr
    # without attribution, dirty-limit is refused with how to get it
    plain = await connect(start_host("--ram", "16M", name="plain").sock)
    assert await qmp_error(plain.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "dirty-limit", "state": True}]})) == (
        "dirty-limit requires per-vCPU dirty page attribution (the 'host' dirty tracker or vCPU threads that "
        "report their writes); mig run gets it with --dirty-tracker host")
    assert (await qmp_error(plain.execute("set-vcpu-dirty-limit", {"dirty-rate": 5}))).endswith(
        "; mig run gets it with --dirty-tracker host")
    h = start_host("--ram", "16M", "--dirty-tracker", "host", name="host")
    c = await connect(h.sock)
    await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "dirty-limit", "state": True}]})
    await c.execute("set-vcpu-dirty-limit", {"dirty-rate": 5})
    assert [x["limit-rate"] for x in await c.execute("query-vcpu-dirty-limit")] == [5]
    assert any(e.get("event") == "dirty_tracker" and e.get("tracker") == "host" for e in h.log_events())
    await c.disconnect()
    await plain.disconnect()
