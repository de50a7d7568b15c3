"""XBZRLE: the encoding, its decoder's checks, and a migration that rewrites a few bytes per page."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mig_core.memory import xbzrle
from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), changes=st.integers(0, 300))
def test_round_trip(seed, changes):
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, 4096, dtype=np.uint8)
    new = old.copy()
    idx = rng.integers(0, 4096, changes)
    new[idx] = rng.integers(0, 256, changes, dtype=np.uint8)
    enc = xbzrle.encode(old, new, 4096)
    if (old == new).all():
        assert enc == b""
        return
    if enc is None:  # too many scattered changes: does not fit one page
        return
    page = old.copy()
    xbzrle.decode(enc, page)
    assert (page == new).all()


def test_format_and_overflow():
    old = np.zeros(4096, dtype=np.uint8)
    new = old.copy()
    new[0:3] = 9
    new[200] = 1
    # zrun 0, nzrun 3 + bytes, zrun 197 (two-byte ULEB), nzrun 1 + byte; no trailing zero run
    assert xbzrle.encode(old, new, 4096) == b"\x00\x03\x09\x09\x09\xc5\x01\x01\x01"
    alternating = old.copy()
    alternating[::2] = 1
    assert xbzrle.encode(old, alternating, 4096) is None


@pytest.mark.parametrize("bad,error", [
    (b"\x00", "Failed to load XBZRLE page - decode error!"),  # a length needs two bytes left
    (b"\x00\x00\x01", "Failed to load XBZRLE page - decode error!"),  # nzrun 0
    (b"\x00\x05\x01", "Failed to load XBZRLE page - decode error!"),  # nzrun past the input
    (b"\x01\x01\x07\x00\x01\x07", "Failed to load XBZRLE page - decode error!"),  # zrun 0 after the first
    (b"\xff\x7f\x01\x01", "Failed to load XBZRLE page - decode error!"),  # writes past the page
    (bytes(5000), "Failed to load XBZRLE page - len overflow!"),
])
def test_decoder_refuses_bad_input(bad, error):
    page = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("!", "!")):
        xbzrle.decode(bad, page)


async def test_migration_with_xbzrle(start_host, tmp_path):
    wl = ("--ram", "16M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "16M")
    s, d = start_host(*wl, name="src"), start_host(*wl, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
        # downtime-limit 0: no switchover while the workload dirties anything, however slowly a busy machine
        # runs it, until the test has seen the cache resized and in use; then the limit lets it complete
        await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20, "downtime-limit": 0,
                                                     "xbzrle-cache-size": 1 << 20})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/x.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})
        await wait_for_status(src, {"active"})
        resized = False
        while (info := await src.execute("query-migrate"))["status"] in ("setup", "active"):
            if info.get("ram", {}).get("dirty-sync-count", 0) >= 2 and not resized:  # resizable while it runs
                await src.execute("migrate-set-parameters", {"xbzrle-cache-size": 16 << 20})
                resized = True
            cache = info.get("xbzrle-cache", {})
            if resized and cache.get("pages", 0) > 100 and cache.get("cache-miss", 0) > 0:
                break
            await asyncio.sleep(0.05)
        await src.execute("migrate-set-parameters", {"downtime-limit": 2000, "max-bandwidth": 0})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        x = info["xbzrle-cache"]
        assert x["cache-size"] == 16 << 20 and resized
        assert x["pages"] > 100 and x["cache-miss"] > 0
        # the workload rewrites 8 bytes per page: encodings are tiny
        assert x["bytes"] < x["pages"] * 64
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
    finally:
        await src.disconnect()
        await dst.disconnect()


def test_cache_allocates_no_more_slots_than_there_are_pages():
    from mig_core.memory.xbzrle import PageCache

    c = PageCache(1 << 63, 4096, max_slots=5000)
    assert c.slots == 8192 and c.data.shape == (8192, 4096)
    assert PageCache(1 << 20, 4096, max_slots=5000).slots == 256  # a smaller cache keeps its size
    # keys below max_slots never share a slot, as in the cache of the size asked for
    assert len({k % c.slots for k in range(5000)}) == 5000


async def test_cache_size_beyond_the_host_is_refused_before_migrating(start_host, tmp_path):
    wl = ("--ram", "16M", "--ram-fill", "random")
    s, d = start_host(*wl, name="src"), start_host(*wl, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
        await src.execute("migrate-set-parameters", {"xbzrle-cache-size": 1 << 63})  # QEMU accepts it here too
        err = await qmp_error(src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"}))
        assert err.startswith("Parameter 'xbzrle-cache-size' (9223372036854775808 bytes) is larger than this "
                              "host's memory (")
        assert await src.execute("query-migrate") == {}
        # a size above the RAM but within the host: only the RAM's worth of slots, and it migrates
        await src.execute("migrate-set-parameters", {"xbzrle-cache-size": 1 << 30})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/x.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})
        info = await wait_for_status(src, {"completed", "failed"})
        assert info["status"] == "completed" and info["xbzrle-cache"]["cache-size"] == 1 << 30
        started = [e for e in s.log_events() if e.get("event") == "xbzrle_started"]
        assert started and all(e["slots"] == 4096 for e in started)  # 16 MiB of 4 KiB pages
    finally:
        await src.disconnect()
        await dst.disconnect()
