"""XBZRLE: the encoding, its decoder's checks, and a migration that rewrites a few bytes per page."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mig_core import xbzrle
from mig_core.testing import connect, ram_digest, wait_for_status


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
        await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20, "downtime-limit": 20,
                                                     "xbzrle-cache-size": 1 << 20})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/x.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})
        await wait_for_status(src, {"active"})
        resized = False
        while (info := await src.execute("query-migrate"))["status"] in ("setup", "active"):
            if info.get("ram", {}).get("dirty-sync-count", 0) >= 2 and not resized:  # resizable while it runs
                await src.execute("migrate-set-parameters", {"xbzrle-cache-size": 16 << 20})
                resized = True
            await __import__("asyncio").sleep(0.05)
        info = await wait_for_status(src, {"completed", "failed"})
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
