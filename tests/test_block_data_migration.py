"""Block data migration (``--drive ...,migrate=on``) end to end: a node written while it migrates arrives
exact with its bitmaps; with ``zero-blocks`` zero blocks cost a marker instead of their bytes."""

from __future__ import annotations

import asyncio
import os

from mig_core.testing import connect, wait_for_status

SIZE = 4 << 20


def image(path, random_bytes: int) -> str:
    """A node's file: ``random_bytes`` of random data, the rest zero."""
    with open(path, "wb") as f:
        f.write(os.urandom(random_bytes))
        f.truncate(SIZE)
    return str(path)


async def migrate(start_host, tmp_path, caps: list[str], src_rate: str, random_bytes: int,
                  throttle: bool) -> dict:
    src_img = image(tmp_path / "src.img", random_bytes)
    dst_img = image(tmp_path / "dst.img", SIZE)  # stale contents the migration must replace, zeroes included
    s = start_host("--ram", "8M", "--ram-fill", "half",
                   f"--drive=node-name=disk0,file={src_img},size=4M,write-rate={src_rate},migrate=on", name="src")
    d = start_host("--ram", "8M", f"--drive=node-name=disk0,file={dst_img},size=4M,migrate=on",
                   "--incoming", "defer", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        on = {"capabilities": [{"capability": c, "state": True} for c in caps]}
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", on)
        if "dirty-bitmaps" in caps:
            await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
        if throttle:  # slow enough that the workload writes to the node while it migrates
            await src.execute("migrate-set-parameters", {"max-bandwidth": 2 << 20})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        (addr,) = (await dst.execute("query-migrate"))["socket-address"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
        if throttle:
            info = await wait_for_status(src, {"active"})
            while info["status"] == "active" and info["ram"]["dirty-sync-count"] < 3:
                await asyncio.sleep(0.02)  # a poller without a pause would take the CPU the migration needs
                info = await src.execute("query-migrate")
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=120)
        assert info["status"] == "completed", info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        # the source stopped at the switchover, the destination writes nothing: the files must be equal
        with open(src_img, "rb") as a, open(dst_img, "rb") as b:
            assert a.read() == b.read()
        out = {"info": info}
        if "dirty-bitmaps" in caps:
            [n_src] = await src.execute("query-named-block-nodes")
            [n_dst] = await dst.execute("query-named-block-nodes")
            out["bitmaps"] = (n_src["dirty-bitmaps"], n_dst["dirty-bitmaps"])
        return out
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_a_node_written_while_it_migrates_arrives_exact_with_its_bitmaps(start_host, tmp_path):
    out = await migrate(start_host, tmp_path, ["dirty-bitmaps", "return-path"], src_rate="1M",
                        random_bytes=SIZE, throttle=True)
    src_bitmaps, dst_bitmaps = out["bitmaps"]
    assert src_bitmaps[0]["count"] > 0  # the workload wrote during the migration
    assert dst_bitmaps == [{**src_bitmaps[0], "busy": False}]


async def test_zero_blocks_go_as_markers(start_host, tmp_path):
    sent = {}
    for caps in (["zero-blocks"], []):
        sub = tmp_path / ("on" if caps else "off")
        sub.mkdir()
        out = await migrate(start_host, sub, caps, src_rate="0", random_bytes=256 << 10, throttle=False)
        sent[bool(caps)] = out["info"]["ram"]["transferred"]
    # 3.75 MiB of the node are zero: without zero-blocks they cross the wire, with it a marker per 64 KiB
    assert sent[False] - sent[True] > (7 << 20) // 2, sent
