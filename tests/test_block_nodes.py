"""Block nodes and their dirty bitmaps through QMP: QEMU's commands, arguments and errors, on ``mig run
--drive`` hosts whose workload writes to the node; persistent bitmaps across a clean exit and a crash."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from mig_core.testing import connect, qmp_error

WL = ("--ram", "4M")


def drive(tmp_path, rate: str = "1M") -> str:
    return f"--drive=node-name=disk0,file={tmp_path}/disk0.img,size=4M,write-rate={rate}"


async def bitmaps(client) -> dict[str, dict]:
    [node] = await client.execute("query-named-block-nodes")
    return {b["name"]: b for b in node["dirty-bitmaps"]}


async def test_bitmap_commands_with_qemus_arguments_and_errors(start_host, tmp_path):
    h = start_host(*WL, drive(tmp_path), name="host")
    c = await connect(h.sock)
    try:
        [node] = await c.execute("query-named-block-nodes", {"flat": True})
        assert node["node-name"] == "disk0" and node["drv"] == "raw" and node["ro"] is False
        assert node["image"] == {"filename": f"{tmp_path}/disk0.img", "format": "raw", "virtual-size": 4 << 20}
        assert node["dirty-bitmaps"] == []

        add = "block-dirty-bitmap-add"
        for args, text in [
            ({"node": "nope", "name": "b"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"node": "disk0", "name": ""}, "Bitmap name cannot be empty"),
            ({"node": "disk0", "name": "b", "granularity": 256}, "Granularity must be power of 2 and at least 512"),
            ({"node": "disk0", "name": "b", "granularity": 3000}, "Granularity must be power of 2 and at least 512"),
            ({"node": "disk0", "name": "x" * 1024}, f"Bitmap name too long: {'x' * 1024}"),
        ]:
            assert await qmp_error(c.execute(add, args)) == text, args
        await c.execute(add, {"node": "disk0", "name": "b0"})
        await c.execute(add, {"node": "disk0", "name": "b1", "granularity": 4096, "disabled": True})
        assert await qmp_error(c.execute(add, {"node": "disk0", "name": "b0"})) == "Bitmap already exists: b0"
        for cmd in ("remove", "clear", "enable", "disable"):
            assert await qmp_error(c.execute(f"block-dirty-bitmap-{cmd}", {"node": "nope", "name": "b0"})) == \
                "Node 'nope' not found"
            assert await qmp_error(c.execute(f"block-dirty-bitmap-{cmd}", {"node": "disk0", "name": "zz"})) == \
                "Dirty bitmap 'zz' not found"

        # the workload writes 1 MB/s to the node: the enabled bitmap records it, the disabled one does not
        got = await _wait_count(c, "b0")
        bm = await bitmaps(c)
        assert bm["b0"] == {"name": "b0", "count": bm["b0"]["count"], "granularity": 65536, "recording": True,
                            "busy": False, "persistent": False}
        assert got % 65536 == 0
        assert bm["b1"]["count"] == 0 and bm["b1"]["recording"] is False and bm["b1"]["granularity"] == 4096

        # disabled: its count stays while a newer bitmap sees the writes go on
        await c.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": "b0"})
        frozen = (await bitmaps(c))["b0"]["count"]
        await c.execute(add, {"node": "disk0", "name": "b2", "granularity": 512})
        await _wait_count(c, "b2")
        assert (await bitmaps(c))["b0"]["count"] == frozen
        await c.execute("block-dirty-bitmap-clear", {"node": "disk0", "name": "b0"})
        assert (await bitmaps(c))["b0"]["count"] == 0
        await c.execute("block-dirty-bitmap-enable", {"node": "disk0", "name": "b0"})
        await _wait_count(c, "b0")
        await c.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b1"})
        assert sorted(await bitmaps(c)) == ["b0", "b2"]
    finally:
        await c.disconnect()


async def _wait_count(c, name: str, timeout: float = 60.0) -> int:
    """Wait until bitmap ``name`` records a write; its count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = (await bitmaps(c))[name]["count"]
        if n:
            return n
        await asyncio.sleep(0.01)
    raise AssertionError(f"bitmap {name} recorded no write in {timeout} s")


async def test_persistent_bitmaps_survive_a_clean_exit_and_are_inconsistent_after_a_crash(start_host, tmp_path):
    h = start_host(*WL, drive(tmp_path), name="first")
    c = await connect(h.sock)
    await c.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "keep", "persistent": True})
    await c.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "gone"})
    await _wait_count(c, "keep")
    await c.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": "keep"})  # its count is final now
    kept = (await bitmaps(c))["keep"]
    await c.execute("quit")
    with contextlib.suppress(EOFError):  # the host closes the connection as it exits
        await c.disconnect()
    assert h.proc.wait(30) == 0

    # a clean exit stored it: it comes back as it was, the transient one does not
    h = start_host(*WL, drive(tmp_path, rate="0"), name="second")
    c = await connect(h.sock)
    assert await bitmaps(c) == {"keep": kept}
    await c.execute("block-dirty-bitmap-enable", {"node": "disk0", "name": "keep"})
    h.proc.send_signal(signal.SIGKILL)
    h.proc.wait(30)
    with contextlib.suppress(EOFError):
        await c.disconnect()

    # after a crash the writes it missed are unknown: inconsistent, refused for use, removable
    h = start_host(*WL, drive(tmp_path, rate="0"), name="third")
    c = await connect(h.sock)
    try:
        after = (await bitmaps(c))["keep"]
        assert after["inconsistent"] is True and after["persistent"] is True
        for cmd in ("enable", "disable", "clear"):
            assert await qmp_error(c.execute(f"block-dirty-bitmap-{cmd}", {"node": "disk0", "name": "keep"})) == \
                "Bitmap 'keep' is inconsistent and cannot be used"
        await c.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "keep"})
        assert await bitmaps(c) == {}
    finally:
        await c.disconnect()
