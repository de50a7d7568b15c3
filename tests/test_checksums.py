"""x-checksums: a busy source's migration stays exact (a page written while it goes out is sent again, not
taken for corruption), both sides must agree, and what it cannot cover yet is refused. Corruption on the
way is in test_network_faults (a proxy flips a bit)."""

from __future__ import annotations

import pytest

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status

RAM = 32 << 20
BUSY = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "8M")
ON = ("--cap", "x-checksums=on")


@pytest.mark.parametrize("setup", [
    {},
    {"caps": ["multifd"], "params": {"multifd-channels": 2}},
    {"caps": ["multifd"], "params": {"multifd-channels": 2, "multifd-compression": "zstd"}},
    {"caps": ["xbzrle"], "params": {}},
], ids=["one-channel", "multifd", "multifd-zstd", "xbzrle"])
async def test_a_busy_source_migrates_exact_with_checksums(start_host, tmp_path, setup):
    s = start_host(*BUSY, *ON, name="src")
    d = start_host(*BUSY, *ON, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    for c in (src, dst):
        caps = [{"capability": n, "state": True} for n in setup.get("caps", [])]
        if caps:
            await c.execute("migrate-set-capabilities", {"capabilities": caps})
        if setup.get("params"):
            await c.execute("migrate-set-parameters", setup["params"])
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
    # slow enough for several passes while both vCPUs write: pages change between hash and send
    await src.execute("migrate-set-parameters", {"max-bandwidth": 24 << 20, "downtime-limit": 2000})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    info = await wait_for_status(src, {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 2
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")


@pytest.mark.parametrize("src_on,dst_on,text", [
    (True, False, "the source sends checksums (x-checksums), but this host has x-checksums off (set it on both "
                  "sides)"),
    (False, True, "this host has x-checksums on, but the source sends no checksums (set it on both sides)"),
])
async def test_both_sides_must_set_it(start_host, tmp_path, src_on, dst_on, text):
    s = start_host("--ram", "8M", *(ON if src_on else ()), name="src")
    d = start_host("--ram", "8M", *(ON if dst_on else ()), "--incoming", "defer", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock", "exit-on-error": False})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
    info = await wait_for_status(dst, {"completed", "failed"})
    assert info["status"] == "failed" and info["error-desc"] == f"load of migration failed: {text}", info
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] in ("completed", "failed")


async def test_what_it_cannot_cover_yet_is_refused(qmp):
    for other, text in (("postcopy-ram", "mig cannot combine x-checksums with postcopy-ram yet"),
                        ("mapped-ram", "mig cannot combine x-checksums with mapped-ram yet")):
        caps = [{"capability": "x-checksums", "state": True}, {"capability": other, "state": True}]
        assert await qmp_error(qmp.execute("migrate-set-capabilities", {"capabilities": caps})) == text
    caps = await qmp.execute("query-migrate-capabilities")
    assert {"capability": "x-checksums", "state": False} in caps
