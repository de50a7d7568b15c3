"""The dirty-bitmaps capability end to end: ``mig run --drive`` hosts whose workload writes to the node
while it migrates; bitmaps arrive by node name or under their block-bitmap-mapping aliases, with QEMU's
behaviour for what cannot be placed."""

from __future__ import annotations

from mig_core.testing import connect, qmp_error, wait_for_status

WL = ("--ram", "8M", "--ram-fill", "half", "--dirty-rate", "1M")
CAPS = {"capabilities": [{"capability": c, "state": True} for c in ("dirty-bitmaps", "return-path")]}


def drive(tmp_path, side: str, node: str = "disk0", rate: str = "0") -> str:
    return f"--drive=node-name={node},file={tmp_path}/{side}.img,size=4M,write-rate={rate}"


async def bitmaps(client, node: str = "disk0") -> dict[str, dict]:
    nodes = {n["node-name"]: n for n in await client.execute("query-named-block-nodes")}
    return {b["name"]: b for b in nodes[node]["dirty-bitmaps"]}


async def pair(start_host, tmp_path, dst_node: str = "disk0"):
    s = start_host(*WL, drive(tmp_path, "src", rate="2M"), name="src")
    d = start_host(*WL, drive(tmp_path, "dst", node=dst_node), "--incoming", "defer", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", CAPS)
    return s, d, src, dst


async def start(src, dst) -> None:
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    (addr,) = (await dst.execute("query-migrate"))["socket-address"]
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})


async def test_bitmaps_arrive_by_node_name_with_every_write_and_are_busy_meanwhile(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, tmp_path)
    try:
        await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
        await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "frozen", "persistent": True,
                                                     "disabled": True})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        await start(src, dst)
        await wait_for_status(src, {"active"})
        assert (await bitmaps(src))["b0"]["busy"] is True
        assert await qmp_error(src.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})) == \
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        # the source stopped at the switchover: its bitmaps hold every write, and so do the destination's
        mine, theirs = await bitmaps(src), await bitmaps(dst)
        assert mine["b0"]["count"] > 0 and mine["b0"]["busy"] is False
        assert theirs == {
            "b0": {"name": "b0", "count": mine["b0"]["count"], "granularity": 4096, "recording": True,
                   "busy": False, "persistent": False},
            "frozen": {"name": "frozen", "count": mine["frozen"]["count"], "granularity": 65536,
                       "recording": False, "busy": False, "persistent": True},
        }
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_block_bitmap_mapping_renames_and_selects(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, tmp_path, dst_node="disk1")
    try:
        for name in ("b0", "skipped"):
            await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name})
        await src.execute("migrate-set-parameters", {"block-bitmap-mapping": [
            {"node-name": "disk0", "alias": "shared-disk",
             "bitmaps": [{"name": "b0", "alias": "backup", "transform": {"persistent": True}}]}]})
        await dst.execute("migrate-set-parameters", {"block-bitmap-mapping": [
            {"node-name": "disk1", "alias": "shared-disk", "bitmaps": [{"name": "restored", "alias": "backup"}]}]})
        await start(src, dst)
        assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        theirs = await bitmaps(dst, "disk1")
        assert list(theirs) == ["restored"]  # a bitmap without an alias stays behind
        assert theirs["restored"]["persistent"] is True  # the transform
        assert theirs["restored"]["count"] == (await bitmaps(src))["b0"]["count"] > 0
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_what_the_destination_cannot_place(start_host, tmp_path):
    # an unknown alias: the bitmaps are dropped with QEMU's text, the machine migrates
    s, d, src, dst = await pair(start_host, tmp_path)
    await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
    await src.execute("migrate-set-parameters", {"block-bitmap-mapping": [
        {"node-name": "disk0", "alias": "elsewhere", "bitmaps": [{"name": "b0", "alias": "b0"}]}]})
    await dst.execute("migrate-set-parameters", {"block-bitmap-mapping": [
        {"node-name": "disk0", "alias": "here", "bitmaps": []}]})
    await start(src, dst)
    assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await bitmaps(dst) == {}
    [cancel] = [e for e in d.log_events() if e.get("event") == "dirty_bitmaps_cancelled"]
    assert cancel["error"] == "Error: Unknown node alias 'elsewhere'"
    await src.disconnect()
    await dst.disconnect()

    # a bitmap of the same name already there fails the load
    second = tmp_path / "second"
    second.mkdir()
    s, d, src, dst = await pair(start_host, second)
    await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
    await dst.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
    await start(src, dst)
    info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
    assert info["status"] == "failed" and info["error-desc"] == "Sibling indicated error 1", info
    dinfo = await wait_for_status(dst, {"failed"})
    assert dinfo["error-desc"] == ("load of migration failed: Bitmap with the same name ('b0') already exists on "
                                   "destination")
    assert (await src.execute("query-status"))["status"] == "running"
    await src.disconnect()
    await dst.disconnect()


async def test_a_name_too_long_to_send_fails_the_setup(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, tmp_path)
    try:
        name = "n" * 256
        await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name})
        await start(src, dst)
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "failed"
        assert info["error-desc"] == f"Cannot migrate bitmap '{name}' on node 'disk0': Name is longer than 255 bytes"
        assert (await bitmaps(src))[name]["busy"] is False
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_an_unknown_bitmap_alias_drops_the_bitmaps(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, tmp_path)
    try:
        for name in ("a", "b"):
            await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": name})
        await src.execute("migrate-set-parameters", {"block-bitmap-mapping": [
            {"node-name": "disk0", "alias": "d",
             "bitmaps": [{"name": "a", "alias": "x"}, {"name": "b", "alias": "y"}]}]})
        await dst.execute("migrate-set-parameters", {"block-bitmap-mapping": [
            {"node-name": "disk0", "alias": "d", "bitmaps": [{"name": "a", "alias": "x"}]}]})
        await start(src, dst)
        assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        # as QEMU cancels the incoming bitmaps: none is kept, not even the one it could place
        assert await bitmaps(dst) == {}
        [cancel] = [e for e in d.log_events() if e.get("event") == "dirty_bitmaps_cancelled"]
        assert cancel["error"] == "Error: Unknown bitmap alias 'y' on node 'disk0' (alias 'd')"
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_bitmaps_arrive_through_a_postcopy_switch(start_host, tmp_path):
    # with postcopy-ram the bitmaps travel in the package the destination loads before it runs
    s, d, src, dst = await pair(start_host, tmp_path)
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        await start(src, dst)
        await wait_for_status(src, {"active"})
        await src.execute("migrate-start-postcopy")
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert info["ram"]["postcopy-bytes"] > 0, info  # pages went after the switch
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        mine, theirs = await bitmaps(src), await bitmaps(dst)
        assert mine["b0"]["count"] > 0
        assert theirs["b0"]["count"] == mine["b0"]["count"] and theirs["b0"]["granularity"] == 4096
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_start_postcopy_with_only_dirty_bitmaps_is_accepted(start_host, tmp_path):
    # QEMU's rule: dirty-bitmaps alone makes migrate-start-postcopy legal; RAM stays precopy
    s, d, src, dst = await pair(start_host, tmp_path)
    try:
        await src.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        await start(src, dst)
        await wait_for_status(src, {"active"})
        assert await src.execute("migrate-start-postcopy") == {}
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert info["ram"]["postcopy-bytes"] == 0, info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        assert (await bitmaps(dst))["b0"]["count"] == (await bitmaps(src))["b0"]["count"] > 0
    finally:
        await src.disconnect()
        await dst.disconnect()
