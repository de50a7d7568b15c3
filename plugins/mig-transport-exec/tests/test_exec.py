"""The exec transport: save a running machine through a command, restore it in a fresh process."""

from __future__ import annotations

import asyncio

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status

WL = ("--ram", "16M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "4M")


async def test_save_through_gzip_and_restore(start_host, tmp_path):
    image = tmp_path / "vm.gz"
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    await src.execute("migrate", {"uri": f"exec:gzip -c > {image}"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    assert image.stat().st_size > 0
    dst_h = start_host(*WL, "--incoming", "defer", "-S", name="dst")
    dst = await connect(dst_h.sock)
    await dst.execute("migrate-incoming", {"channels": [{"channel-type": "main", "addr": {
        "transport": "exec", "args": ["gzip", "-dc", str(image)]}}]})
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
    await src.disconnect()
    await dst.disconnect()


async def test_failing_commands_fail_the_migration_with_status_and_stderr(start_host, tmp_path):
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    await src.execute("migrate", {"uri": "exec:echo no space left >&2; exit 3"})
    info = await wait_for_status(src, {"failed", "completed"})
    assert info["status"] == "failed"
    assert info["error-desc"].startswith("command 'echo no space left >&2; exit 3' exited with status 3")
    assert "no space left" in info["error-desc"]
    assert (await src.execute("query-status"))["status"] == "running"
    # a command that cannot even start is reported by migrate itself, and the migration is failed
    assert await qmp_error(src.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "exec", "args": ["/nonexistent/tool"]}}]})) == (
        "failed to run '/nonexistent/tool': No such file or directory")
    info = await src.execute("query-migrate")
    assert info["status"] == "failed" and info["error-desc"].startswith("failed to run")
    await src.execute("migrate", {"uri": f"exec:cat > {tmp_path}/ok"})  # and a good one still works
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    await src.disconnect()


async def test_incoming_command_that_fails(start_host, tmp_path):
    dst_h = start_host(*WL, "--incoming", "defer", name="dst")
    dst = await connect(dst_h.sock)
    await dst.execute("migrate-incoming", {"uri": "exec:echo truncated >&2; printf MIGSTRM; exit 2",
                                           "exit-on-error": False})
    info = await wait_for_status(dst, {"failed"})
    assert info["error-desc"].startswith("load of migration failed: ")
    assert "exited with status 2" in info["error-desc"] or "truncated stream" in info["error-desc"]
    assert await qmp_error(dst.execute("migrate-incoming", {"uri": "exec:true"})) == (
        "The incoming migration has already been started")
    await dst.disconnect()
    await asyncio.sleep(0)
