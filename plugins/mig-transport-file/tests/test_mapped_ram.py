"""mapped-ram: RAM at fixed file offsets, written live by one or several channels, restored exactly."""

from __future__ import annotations

import os
import shutil

import pytest

from mig_core.testing import Host, connect, qmp_error, ram_digest, wait_for_status

RAM = 16 << 20
WL = ("--ram", "16M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "8M")


async def caps(client, *names: str) -> None:
    await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": c, "state": True}
                                                                        for c in names]})


async def save(start_host, image, multifd: int = 0, params: dict | None = None, offset: int = 0):
    src = await connect(start_host(*WL, name="src").sock)
    await caps(src, "mapped-ram", *(["multifd"] if multifd else []))
    await src.execute("migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 32 << 20,
                                                 **({"multifd-channels": multifd} if multifd else {}),
                                                 **(params or {})})
    await src.execute("migrate", {"uri": f"file:{image},offset={offset}"})
    info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    return src, info


async def restore(start_host, image, multifd: int = 0, params: dict | None = None, name="dst", offset: int = 0):
    dst = await connect(start_host(*WL, "--incoming", "defer", "-S", name=name).sock)
    await caps(dst, "mapped-ram", *(["multifd"] if multifd else []))
    if multifd or params:
        await dst.execute("migrate-set-parameters", {**({"multifd-channels": multifd} if multifd else {}),
                                                     **(params or {})})
    await dst.execute("migrate-incoming", {"uri": f"file:{image},offset={offset}", "exit-on-error": False})
    return dst, await wait_for_status(dst, {"completed", "failed"}, timeout=60)


@pytest.mark.parametrize("channels", [0, 1, 4])
async def test_save_and_restore(start_host, tmp_path, channels):
    image = tmp_path / "vm.img"
    src, info = await save(start_host, image, channels, offset=4096 * 3 + 17)
    assert info["ram"]["dirty-sync-count"] >= 2  # saved live: pages rewritten in place over several passes
    # bounded by the RAM size (plus 1 MiB-aligned metadata), however many passes ran
    assert image.stat().st_size <= RAM + (4 << 20)
    # zero pages are holes, never written
    assert os.stat(image).st_blocks * 512 < RAM
    dst, dinfo = await restore(start_host, image, channels, offset=4096 * 3 + 17)
    assert dinfo["status"] == "completed", dinfo
    assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    await src.disconnect()
    await dst.disconnect()


async def test_truncated_and_foreign_files_are_refused(start_host, tmp_path):
    image = tmp_path / "vm.img"
    src, _ = await save(start_host, image, 2)
    data = image.read_bytes()
    (tmp_path / "cut.img").write_bytes(data[: len(data) - (4 << 20)])
    dst, info = await restore(start_host, tmp_path / "cut.img", 2, name="cut")
    assert info["status"] == "failed"
    assert "truncated file: RAM block 'pc.ram' has pages up to byte" in info["error-desc"], info
    (tmp_path / "foreign.img").write_bytes(b"\x7fELF" + bytes(8 << 20))
    dst2, info = await restore(start_host, tmp_path / "foreign.img", 2, name="foreign")
    assert info["error-desc"] == ("load of migration failed: not a mig migration stream "
                                  "(bad magic b'\\x7fELF\\x00\\x00\\x00\\x00')")
    # a file saved without mapped-ram is refused by a host expecting it, and the other way round
    plain = tmp_path / "plain.img"
    await src.execute("cont")
    await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": False},
                                                                    {"capability": "multifd", "state": False}]})
    await src.execute("migrate", {"uri": f"file:{plain}"})
    await wait_for_status(src, {"completed"})
    dst3, info = await restore(start_host, plain, 2, name="plain")
    assert info["error-desc"] == ("load of migration failed: Capability mapped-ram is on, but received capability "
                                  "is off"), info
    for c in (src, dst, dst2, dst3):
        await c.disconnect()


async def test_direct_io(start_host, tmp_path):
    image = tmp_path / "vm.img"
    src, _ = await save(start_host, image, 2, params={"direct-io": True})
    ev = [e for e in (tmp_path / "src0.log").read_text().splitlines() if '"file_opened"' in e]
    assert sum('"direct_io": true' in e for e in ev) == 2  # the two multifd descriptors; the main one is not
    dst, info = await restore(start_host, image, 2, params={"direct-io": True})
    assert info["status"] == "completed", info
    assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    await src.disconnect()
    await dst.disconnect()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root to mount ramfs")
async def test_direct_io_on_a_file_system_without_it(start_host, tmp_path):
    """ramfs has no O_DIRECT: the migration fails with a clear error and the source runs on."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    wrapper = ["unshare", "-m", "sh", "-c", f"mount -t ramfs none {mnt} && exec \"$@\"", "sh"]

    h = Host(tmp_path, *WL, name="rsrc", wrapper=wrapper)
    try:
        src = await connect(h.sock)
        await caps(src, "mapped-ram", "multifd")
        await src.execute("migrate-set-parameters", {"direct-io": True})
        await src.execute("migrate", {"uri": f"file:{mnt}/vm.img"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=30)
        assert info["status"] == "failed"
        assert info["error-desc"] == (f"Could not open '{mnt}/vm.img' with O_DIRECT (direct-io): its file system "
                                      "does not support direct I/O")
        assert (await src.execute("query-status"))["status"] == "running"
        await src.disconnect()
    finally:
        h.stop()


async def test_mapped_ram_rules(start_host, tmp_path):
    src = await connect(start_host(*WL, name="src").sock)
    await caps(src, "mapped-ram")
    assert await qmp_error(src.execute("migrate", {"uri": f"unix:{tmp_path}/x.sock"})) == (
        "Migration requires seekable transport (e.g. file)")
    await caps(src, "multifd")
    assert await qmp_error(src.execute("migrate-set-parameters", {"multifd-compression": "zlib"})) == (
        "Mapped-ram only available for non-compressed non-TLS multifd migration")
    # compression chosen before mapped-ram was switched on: migrate refuses it
    await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": False}]})
    await src.execute("migrate-set-parameters", {"multifd-compression": "zlib"})
    await caps(src, "mapped-ram")
    assert await qmp_error(src.execute("migrate", {"uri": f"file:{tmp_path}/vm.img"})) == (
        "Cannot use compression with mapped-ram")
    await src.disconnect()
