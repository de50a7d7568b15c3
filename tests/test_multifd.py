"""Multifd: parallel channels between two real mig run processes, with and without compression."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from mig_core.engine.ram_pass import BATCH_PAGES, batch_pages
from mig_core.testing import (
    connect,
    ram_digest,
    vcpu_records,
    wait_for_status,
    wait_records_advance,
    wait_until_async,
)

RAM = 32 << 20


def workload(fill: str = "half", *extra: str) -> tuple[str, ...]:
    return ("--ram", "32M", "--ram-fill", fill, "--vcpus", "2", "--dirty-rate", "8M", *extra)


async def setup_pair(start_host, tmp_path, *, channels: int, compression: str = "none", fill: str = "half",
                     caps: tuple[str, ...] = (), src_params: dict | None = None, dst_channels: int | None = None,
                     dst_compression: str | None = None, dst_multifd: bool = True, extra: tuple[str, ...] = ()):
    s = start_host(*workload(fill, *extra), name="src")
    d = start_host(*workload(fill, *extra), "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    on = [{"capability": c, "state": True} for c in ("multifd", "return-path", *caps)]
    await src.execute("migrate-set-capabilities", {"capabilities": on})
    dst_on = [c for c in on if c["capability"] != "multifd" or dst_multifd]
    await dst.execute("migrate-set-capabilities", {"capabilities": dst_on})
    await src.execute("migrate-set-parameters", {"multifd-channels": channels, "multifd-compression": compression,
                                                 "max-bandwidth": 64 << 20, "downtime-limit": 300,
                                                 **(src_params or {})})
    await dst.execute("migrate-set-parameters", {
        "multifd-channels": dst_channels or channels, "multifd-compression": dst_compression or compression})
    return s, d, src, dst


async def listen_tcp(dst, exit_on_error: bool = True) -> str:
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": exit_on_error})
    (sa,) = (await dst.execute("query-migrate"))["socket-address"]
    return f"tcp:127.0.0.1:{sa['port']}"


async def finish_and_compare(src, dst, tmp_path):
    info = await wait_for_status(src, {"completed", "failed", "cancelled"}, timeout=60)
    assert info["status"] == "completed", info
    await wait_for_status(dst, {"completed"})
    assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    return info


@pytest.mark.parametrize("channels", [1, 2, 8])
async def test_multifd_channels_over_tcp(start_host, tmp_path, channels):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=channels)
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        info = await finish_and_compare(src, dst, tmp_path)
        ram = info["ram"]
        # pages went over the multifd channels; the main channel carried only metadata
        assert ram["multifd-bytes"] > ram["normal-bytes"] > 0
        assert ram["precopy-bytes"] + ram["downtime-bytes"] < 1 << 20
        assert ram["duplicate"] > 0 and ram["dirty-sync-count"] >= 2
        assert "compression" not in info
        # the destination runs on from the migrated state
        before = await vcpu_records(dst, 2, tmp_path / "r1")
        await dst.execute("cont")
        await wait_records_advance(dst, 2, before, tmp_path / "r2")  # the workload runs on there
        # the channel threads are gone
        threads = await src.execute("query-migrationthreads")
        assert not [t for t in threads if t["name"].startswith("mig/src/send")]
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_multifd_over_unix_socket(start_host, tmp_path):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=4)
    try:
        uri = f"unix:{tmp_path}/m.sock"
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        await finish_and_compare(src, dst, tmp_path)
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("method,level", [("zlib", "multifd-zlib-level"), ("zstd", "multifd-zstd-level")])
async def test_multifd_compression(start_host, tmp_path, method, level):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, compression=method, fill="text",
                                      src_params={level: 3})
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        info = await finish_and_compare(src, dst, tmp_path)
        comp = info["compression"]
        assert comp["pages"] > 0 and comp["compressed-size"] > 0
        # text-like data compresses: fewer bytes on the wire than the pages sent
        assert comp["compressed-size"] < comp["pages"] * 4096 / 2
        assert info["ram"]["multifd-bytes"] < info["ram"]["normal-bytes"]
        assert comp["compression-rate"] > 2
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("detection", ["multifd", "legacy", "none"])
async def test_zero_page_detection_modes(start_host, tmp_path, detection):
    """Preallocated zeroed RAM: every page is populated, and only detection keeps zeros off the wire."""
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, fill="zero", extra=("--mem-prealloc",),
                                      src_params={"zero-page-detection": detection})
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        ram = (await finish_and_compare(src, dst, tmp_path))["ram"]
        pages = RAM // 4096
        if detection == "none":
            assert ram["duplicate"] == 0 and ram["normal"] >= pages
        else:
            # every page that is zero was found to be zero (not sent as data); only pages holding data went as
            # data, each at most once per pass
            await dst.execute("pmemsave", {"val": 0, "size": RAM, "filename": str(tmp_path / "dst.ram")})
            words = np.fromfile(tmp_path / "dst.ram", dtype=np.uint64).reshape(pages, -1)
            nonzero = int(words.any(axis=1).sum())
            assert ram["duplicate"] >= pages - nonzero, (ram, nonzero)
            assert ram["normal"] <= nonzero * ram["dirty-sync-count"], (ram, nonzero)
        if detection == "legacy":  # zero pages are found by the migration thread; markers go on the main channel
            assert ram["multifd-bytes"] < ram["normal-bytes"] + (1 << 20)
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("settings,error", [
    ({"dst_channels": 3}, "the source uses 2 multifd channels, this host expects multifd-channels 3"),
    ({"dst_multifd": False}, "Capability multifd is off, but received capability is on"),
    ({"compression": "zlib", "dst_compression": "zstd"}, "multifd-compression 'zlib', this host has 'zstd'"),
], ids=["channel-count", "multifd-off", "compression"])
async def test_mismatched_destination_is_refused(start_host, tmp_path, settings, error):
    """The destination reads the source's CONFIG first and names what differs; the source runs on."""
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, **settings)
    try:
        uri = await listen_tcp(dst, exit_on_error=False)
        await src.execute("migrate", {"uri": uri})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=30)
        assert info["status"] == "failed"
        dinfo = await wait_for_status(dst, {"failed"})
        assert error in dinfo["error-desc"]
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_garbage_on_a_multifd_channel_fails_the_destination_cleanly(start_host, tmp_path):
    """A fake source: a correct main stream start, then a multifd channel carrying a bad packet."""
    import uuid as uuid_mod

    import msgpack

    from mig_core.stream.format import HEADER, MAGIC, META_HEADER, Command, Section
    from mig_core.stream.multifd import init_packet, pack_header

    d = start_host(*workload(), "--incoming", "defer", name="dst")
    dst = await connect(d.sock, "dst")
    try:
        await dst.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        await dst.execute("migrate-set-parameters", {"multifd-channels": 1})
        uri = await listen_tcp(dst, exit_on_error=False)
        port = int(uri.rsplit(":", 1)[1])
        u = str(uuid_mod.uuid4())

        def meta(section, obj):
            p = msgpack.packb(obj, use_bin_type=True)
            return META_HEADER.pack(section, len(p)) + p

        main = socket.create_connection(("127.0.0.1", port))
        main.sendall(HEADER.pack(MAGIC, 1, 0, uuid_mod.UUID(u).bytes) + meta(Section.BLOCKS, [["pc.ram", RAM, 4096]])
                     + meta(Section.COMMAND, [int(Command.CONFIG), {"multifd": {"channels": 1,
                                                                                "compression": "none"}}]))
        ch = socket.create_connection(("127.0.0.1", port))
        # a packet naming a page beyond the block
        ch.sendall(init_packet(0, 1, u) + pack_header(0, 1, 0, 1, 0, 4096, 1)
                   + (RAM // 4096 + 5).to_bytes(8, "little") + bytes(4096))
        info = await wait_for_status(dst, {"failed"}, timeout=10)
        assert "multifd 0: offset too long" in info["error-desc"]
        main.close()
        ch.close()
    finally:
        await dst.disconnect()


async def test_zero_copy_send_over_tcp(start_host, tmp_path):
    """MSG_ZEROCOPY on loopback: the kernel copies anyway, so every sync counts a miss; the data is right."""
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, caps=("zero-copy-send",))
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        info = await finish_and_compare(src, dst, tmp_path)
        ram = info["ram"]
        assert ram["dirty-sync-missed-zero-copy"] >= 1
        assert ram["dirty-sync-missed-zero-copy"] <= ram["dirty-sync-count"]
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_zero_copy_send_needs_a_socket_that_supports_it(start_host, tmp_path):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, caps=("zero-copy-send",))
    try:
        uri = f"unix:{tmp_path}/zc.sock"
        await dst.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})
        await src.execute("migrate", {"uri": uri})
        info = await wait_for_status(src, {"failed", "completed"}, timeout=30)
        assert info["status"] == "failed"
        assert info["error-desc"] == "Zero copy send feature not detected in host kernel"
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_cancel_during_multifd_returns_promptly(start_host, tmp_path):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=4, src_params={"max-bandwidth": 4 << 20})
    try:
        uri = await listen_tcp(dst, exit_on_error=False)
        await src.execute("migrate", {"uri": uri})
        await wait_for_status(src, {"active"})
        await asyncio.sleep(0.3)
        await src.execute("migrate_cancel")  # the channels were blocked in sends: the cancel unblocks them
        await wait_for_status(src, {"cancelled"})
        threads = await src.execute("query-migrationthreads")
        assert not [t for t in threads if t["name"].startswith("mig/src/send")]
        await wait_for_status(dst, {"failed"})
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_channel_threads_are_listed_while_migrating(start_host, tmp_path):
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=3, src_params={"max-bandwidth": 8 << 20})
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        await wait_for_status(src, {"active"})
        names = {t["name"] for t in await src.execute("query-migrationthreads")}
        assert {"mig/src/send_0", "mig/src/send_1", "mig/src/send_2", "live_migration"} <= names
        for _ in range(100):  # the destination starts its threads once every channel has connected
            dnames = {t["name"] for t in await dst.execute("query-migrationthreads")}
            if {"mig/dst/recv_0", "mig/dst/recv_2"} <= dnames:
                break
            await asyncio.sleep(0.05)
        assert {"mig/dst/recv_0", "mig/dst/recv_2"} <= dnames
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await finish_and_compare(src, dst, tmp_path)
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_destination_killed_during_multifd(start_host, tmp_path):
    """kill -9 of the destination mid-pass: the source fails cleanly, runs on, and migrates again."""
    import os
    import signal

    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=4, src_params={"max-bandwidth": 4 << 20})
    try:
        uri = await listen_tcp(dst)
        await src.execute("migrate", {"uri": uri})
        await wait_for_status(src, {"active"})
        await asyncio.sleep(0.3)
        os.kill(d.proc.pid, signal.SIGKILL)
        info = await wait_for_status(src, {"failed", "completed"}, timeout=20)
        assert info["status"] == "failed" and info["error-desc"], info
        assert (await src.execute("query-status"))["status"] == "running"
        assert not [t for t in await src.execute("query-migrationthreads") if t["name"].startswith("mig/src/send")]
        # a second destination takes the migration
        d2 = start_host(*workload(), "--incoming", "defer", "-S", name="dst2")
        dst2 = await connect(d2.sock, "dst2")
        await dst2.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "multifd", "state": True}, {"capability": "return-path", "state": True}]})
        await dst2.execute("migrate-set-parameters", {"multifd-channels": 4})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await src.execute("migrate", {"uri": await listen_tcp(dst2)})
        await finish_and_compare(src, dst2, tmp_path)
        await dst2.disconnect()
    finally:
        await src.disconnect()


@pytest.mark.parametrize("channels,compression", [(1, "none"), (2, "zstd")])
async def test_a_file_backed_source_under_writes_arrives_whole(start_host, tmp_path, channels, compression):
    """The source reads its file-backed RAM through a second, huge, read-only mapping where the kernel
    makes one (RAMBlock.read_view) while the vCPUs write through the tracked one: every write still
    arrives."""
    ram = tmp_path / "src.ram"
    ram.write_bytes(np.random.default_rng(5).integers(0, 256, RAM, dtype=np.uint8).tobytes())
    args = ("--ram", f"32M,backing=file,path={ram}", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "8M")
    s = start_host(*args, name="src")
    d = start_host(*workload("half"), "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": x, "state": True} for x in ("multifd", "return-path")]})
            await c.execute("migrate-set-parameters", {"multifd-channels": channels,
                                                       "multifd-compression": compression})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 64 << 20, "downtime-limit": 300})
        await src.execute("migrate", {"uri": await listen_tcp(dst)})
        info = await finish_and_compare(src, dst, tmp_path)
        assert info["ram"]["dirty-sync-count"] >= 2  # pages written while they were being sent went again
        mapped = [e for e in s.log_events() if e.get("event") == "ram_block_read_mapping"]
        assert len(mapped) == 1 and mapped[0]["block"] == "pc.ram"  # probed once, on the first pass
        # and unmapped when the migration's clean-up ran (just after `completed`): the source maps its RAM
        # file once again, so its RSS counts it once
        def mapped_once() -> bool:
            with open(f"/proc/{s.proc.pid}/maps") as maps:
                return sum(line.rstrip().endswith(str(ram)) for line in maps) == 1

        await wait_until_async(mapped_once)
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("compression", ["none", "zstd", "zlib"])
async def test_unpaced_jobs_arrive_whole_under_writes(start_host, tmp_path, compression):
    """max-bandwidth 0: the channels get 16 MiB jobs (``batch_pages``), a text-like one compressed as one
    packet, while two vCPUs write; every page arrives as the source last had it."""
    s, d, src, dst = await setup_pair(start_host, tmp_path, channels=2, compression=compression, fill="text",
                                      src_params={"max-bandwidth": 0})
    try:
        await src.execute("migrate", {"uri": await listen_tcp(dst)})
        info = await finish_and_compare(src, dst, tmp_path)
        assert info["ram"]["normal"] > 0
    finally:
        await src.disconnect()
        await dst.disconnect()


def test_multifd_jobs_grow_only_where_pacing_allows():
    """16 MiB multifd jobs where max-bandwidth is off or lets one 100 ms window carry one (QEMU paces by
    limit/10 bytes per window); 4 MiB batches otherwise, and on the main stream."""
    assert batch_pages(4096, 0, multifd=True) == 4096
    assert batch_pages(4096, 0, multifd=False) == BATCH_PAGES
    assert batch_pages(4096, 128 << 20, multifd=True) == BATCH_PAGES  # QEMU's default: 12.8 MiB a window
    assert batch_pages(4096, 160 << 20, multifd=True) == 4096
    assert batch_pages(64 << 10, 0, multifd=True) == BATCH_PAGES  # never fewer pages than a batch
