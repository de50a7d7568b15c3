"""xen-save-devices-state / xen-load-devices-state (device state alone, to and from a file) and
xen-set-global-dirty-log, against real hosts and files."""

from __future__ import annotations

import os

import numpy as np

from mig_core.control.manager import MigrationManager
from mig_core.machine.machine import Machine
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.commands import XenSetGlobalDirtyLogArgs
from mig_core.testing import connect, qmp_error, wait_for_status

WL = ("--ram", "16M", "--vcpus", "2", "--dirty-rate", "1M")


async def test_device_state_moves_through_a_file(start_host, tmp_path):
    src = await connect(start_host(*WL, name="src").sock)
    dst = await connect(start_host(*WL, name="dst").sock)
    path = tmp_path / "devices"
    await src.execute("xen-save-devices-state", {"filename": str(path)})
    assert (await src.execute("query-status"))["status"] == "running"  # stopped meanwhile, running again
    assert path.read_bytes()[:8] == b"MIGSTRM\x00" and path.stat().st_size < 4096  # no RAM in it
    assert await qmp_error(dst.execute("xen-load-devices-state", {"filename": str(path)})) == (
        "Cannot update device state while vm is running")
    await dst.execute("stop")
    await dst.execute("xen-load-devices-state", {"filename": str(path)})
    assert (await dst.execute("query-status"))["status"] == "restore-vm"  # QEMU leaves it stopped
    # the loaded state is the saved one: saved again, byte for byte (both stopped, nothing ticks)
    await src.execute("stop")
    await src.execute("xen-save-devices-state", {"filename": str(tmp_path / "a"), "live": False})
    await dst.execute("xen-save-devices-state", {"filename": str(tmp_path / "b")})
    await src.execute("xen-load-devices-state", {"filename": str(tmp_path / "a")})
    await dst.execute("xen-load-devices-state", {"filename": str(tmp_path / "a")})
    await src.execute("xen-save-devices-state", {"filename": str(tmp_path / "a2")})
    await dst.execute("xen-save-devices-state", {"filename": str(tmp_path / "b2")})
    assert (tmp_path / "a2").read_bytes() == (tmp_path / "b2").read_bytes()
    await dst.execute("cont")
    assert (await dst.execute("query-status"))["status"] == "running"
    await src.disconnect()
    await dst.disconnect()


async def test_bad_files_are_refused_before_anything_changes(start_host, tmp_path):
    h = await connect(start_host(*WL, "--ram-fill", "half", name="h").sock)
    await h.execute("stop")
    assert await qmp_error(h.execute("xen-save-devices-state", {"filename": f"{tmp_path}/no/such/x"})) == (
        f"Unable to open {tmp_path}/no/such/x: No such file or directory")
    assert await qmp_error(h.execute("xen-load-devices-state", {"filename": f"{tmp_path}/none"})) == (
        f"Unable to open {tmp_path}/none: No such file or directory")
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(64))
    assert await qmp_error(h.execute("xen-load-devices-state", {"filename": str(tmp_path / "elf")})) == (
        f"loading Xen device state failed: {tmp_path}/elf is not a mig device-state file (it starts with "
        "b'\\x7fELF\\x00\\x00\\x00\\x00')")
    assert (await qmp_error(h.execute("xen-load-devices-state", {"filename": "/dev/zero"}))).startswith(
        "loading Xen device state failed: /dev/zero is not a mig device-state file")
    os.mkfifo(tmp_path / "fifo")
    assert await qmp_error(h.execute("xen-load-devices-state", {"filename": str(tmp_path / "fifo")})) == (
        f"loading Xen device state failed: {tmp_path}/fifo is not a mig device-state file (it starts with b'')")
    # a migration stream (with RAM pages) is not a device-state file: refused, RAM untouched
    await h.execute("migrate", {"uri": f"file:{tmp_path}/full.img"})
    assert (await wait_for_status(h, {"completed", "failed"}))["status"] == "completed"
    before = await h.execute("pmemsave", {"val": 0, "size": 16 << 20, "filename": str(tmp_path / "m0")})
    error = await qmp_error(h.execute("xen-load-devices-state", {"filename": str(tmp_path / "full.img")}))
    assert error.startswith("loading Xen device state failed: "), error
    await h.execute("pmemsave", {"val": 0, "size": 16 << 20, "filename": str(tmp_path / "m1")})
    assert before == {} and (tmp_path / "m0").read_bytes() == (tmp_path / "m1").read_bytes()
    await h.disconnect()


def test_global_dirty_log_records_writes_while_on():
    m = Machine()
    b = m.add_ram("ram0", 4 << 20)
    m.host_marks_writes = True
    m.tracker_name = "host"
    manager = MigrationManager(m)
    manager.xen_set_global_dirty_log(from_qmp(XenSetGlobalDirtyLogArgs, {"enable": True}))
    manager.xen_set_global_dirty_log(from_qmp(XenSetGlobalDirtyLogArgs, {"enable": True}))  # twice: no error
    log = manager.global_dirty_log
    assert log.enabled
    b.array[5 * 4096] = 1
    m.mark_pages("ram0", np.array([5, 9]))
    assert log.collect().pages["ram0"].tolist() == [5, 9]
    assert log.collect().pages["ram0"].tolist() == []
    manager.xen_set_global_dirty_log(from_qmp(XenSetGlobalDirtyLogArgs, {"enable": False}))
    assert not manager.global_dirty_log.enabled
    manager.xen_set_global_dirty_log(from_qmp(XenSetGlobalDirtyLogArgs, {"enable": False}))
    m.close()
