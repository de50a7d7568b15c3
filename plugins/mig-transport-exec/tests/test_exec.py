"""The exec transport: save a running machine through a command, restore it in a fresh process."""

from __future__ import annotations

import asyncio
import os
import subprocess

from mig_transport_exec import EXIT_TIMEOUT

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status, wait_until
from mig_core.testing.contracts import TransportContract

WL = ("--ram", "16M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "4M")


async def restore_exact(start_host, src, tmp_path, incoming: dict) -> None:
    """Restore what ``src`` saved into a fresh paused host; its RAM must equal the source's."""
    dst_h = start_host(*WL, "--incoming", "defer", "-S", name="dst")
    dst = await connect(dst_h.sock)
    await dst.execute("migrate-incoming", incoming)
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
    await src.disconnect()
    await dst.disconnect()


async def test_save_through_gzip_and_restore(start_host, tmp_path):
    image = tmp_path / "vm.gz"
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    await src.execute("migrate", {"uri": f"exec:gzip -c > {image}"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    assert image.stat().st_size > 0
    await restore_exact(start_host, src, tmp_path, {"channels": [{"channel-type": "main", "addr": {
        "transport": "exec", "args": ["gzip", "-dc", str(image)]}}]})


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


def _processes_with(marker: str) -> list[str]:
    """Command lines of running processes that carry ``marker`` (zombies excluded)."""
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and not line.lstrip().startswith("Z")]


async def test_child_that_never_exits_is_cancelled_and_its_group_reaped(start_host, tmp_path):
    """A child that reads the whole stream but never exits: cancel ends it within a second, no process
    of its group survives, the source runs on and the next migration is exact."""
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    marker = f"{os.getpid()}{id(tmp_path)}"
    await src.execute("migrate", {"uri": f"exec:cat > /dev/null; sleep 1000{marker}"})
    await wait_for_status(src, {"device"})  # the stream is written; the source waits for the child
    assert (await src.execute("query-status"))["status"] == "finish-migrate"
    await src.execute("migrate_cancel")  # before the fix: cancelling for good
    info = await wait_for_status(src, {"cancelled", "failed", "completed"})
    assert info["status"] == "cancelled"
    assert _processes_with(marker) == []
    assert (await src.execute("query-status"))["status"] == "running"
    await src.execute("migrate", {"uri": f"exec:cat > {tmp_path}/img"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    await restore_exact(start_host, src, tmp_path, {"uri": f"exec:cat {tmp_path}/img"})


async def test_child_that_never_exits_fails_the_migration_after_the_exit_timeout(start_host, tmp_path):
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    marker = f"{os.getpid()}{id(src)}"
    command = f"cat > /dev/null; sleep 1000{marker}"
    await src.execute("migrate", {"uri": f"exec:{command}"})
    info = await wait_for_status(src, {"failed", "completed", "cancelled"}, timeout=EXIT_TIMEOUT + 30)
    assert info["status"] == "failed"
    assert info["error-desc"] == (f"command '{command}' did not exit within {EXIT_TIMEOUT:g} s after the end "
                                  "of the stream")
    assert _processes_with(marker) == []
    assert (await src.execute("query-status"))["status"] == "running"
    await src.disconnect()


async def test_successful_migration_leaves_no_process_of_the_group(start_host, tmp_path):
    """The command exits 0 but left a background process in its group: that one is ended too."""
    src_h = start_host(*WL, name="src")
    src = await connect(src_h.sock)
    marker = f"{os.getpid()}{id(src)}"
    await src.execute("migrate", {"uri": f"exec:(sleep 1000{marker} &) ; cat > {tmp_path}/img"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    wait_until(lambda: _processes_with(marker) == [], timeout=10)
    await src.disconnect()


def test_nul_bytes_in_the_command_are_refused_before_anything_runs():
    from mig_core import PluginRegistry
    from mig_core.ext.transport import TransportContext, TransportError, TransportRegistry

    reg = TransportRegistry(PluginRegistry())
    cls, addr = reg.parse("exec:echo a\0b")
    t = cls(TransportContext())
    import pytest

    with pytest.raises(TransportError, match="exec: the command contains a NUL byte"):
        t.check_address(addr, incoming=False)


class TestContract(TransportContract):
    """mig's transport contract (mig_core.testing.contracts): one command writes, another reads."""

    name = "exec"
    distribution = "mig-transport-exec"
    live_peer = False

    def source_address(self, tmp_path):
        from mig_transport_exec import ExecTransport

        return ExecTransport.parse_uri(f"exec:cat > {tmp_path}/contract.bin")

    def destination_address(self, tmp_path):
        from mig_transport_exec import ExecTransport

        return ExecTransport.parse_uri(f"exec:cat {tmp_path}/contract.bin")
