"""Migration blockers (issue 19, item 5): host software, devices and mig register reasons not to migrate;
migrate and snapshot-save are refused with them, query-migrate lists them, and one added while a
migration runs is refused (QEMU) or, forced, fails that migration with its reason."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from mig_core.control.manager import MigrationManager
from mig_core.errors import QMPError
from mig_core.machine.blockers import BlockerRefused
from mig_core.machine.device import Device
from mig_core.machine.machine import Machine
from mig_core.plugin.registry import PluginRegistry
from mig_core.qapi import to_qmp
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigMode, MigrationStatus
from mig_core.schema.parameters import MigrateSetParameters
from mig_core.testing import LoopbackTransport, connect, migrate_in_process, qmp_error, wait_until


async def test_a_blocked_host_refuses_migrate_and_snapshot_save(start_host, tmp_path):
    h = start_host("--ram", "16M", "--migration-blocker", "the disk is being resized",
                   "--migration-blocker", "a passthrough device is resetting", "--snapshot-dir", str(tmp_path / "s"))
    c = await connect(h.sock)
    # with no migration ever run, the reasons are all query-migrate says (newest first, as QEMU's list)
    assert await c.execute("query-migrate") == {
        "blocked-reasons": ["a passthrough device is resetting", "the disk is being resized"]}
    with pytest.raises(Exception) as e:
        await c.execute("migrate", {"uri": f"unix:{tmp_path}/nowhere.sock"})
    assert e.value.error.error.desc == "a passthrough device is resetting"  # type: ignore[attr-defined]
    await c.execute("snapshot-save", {"job-id": "s0", "tag": "t", "vmstate": "snap0", "devices": ["snap0"]})
    while (job := (await c.execute("query-jobs"))[0])["status"] != "concluded":
        await asyncio.sleep(0.05)
    assert job["error"] == "a passthrough device is resetting"
    assert (await c.execute("query-status"))["status"] == "running"  # never stopped for the refused save
    assert await c.execute("x-query-snapshots") == []
    await c.disconnect()


class Passthrough(Device):
    """A device whose state cannot travel (QEMU's unmigratable vmsd)."""

    id = "passthrough0"
    unmigratable = True

    def save_state(self) -> Any:
        return {}

    def load_state(self, state: Any, version: int) -> None:
        pass


def machine(runstate: RunState) -> Machine:
    m = Machine(runstate=runstate)
    m.add_ram("ram0", 8 << 20)
    m.blocks[0].array[:] = np.random.default_rng(3).integers(0, 256, 8 << 20, dtype=np.uint8)
    m.mark_pages("ram0", np.arange(m.blocks[0].npages))
    return m


async def test_mig_blocks_a_host_no_dirty_tracker_can_serve(start_host, tmp_path):
    """mig registers a blocker itself when no tracker can serve the machine (here the one named in
    MIG_DIRTY_TRACKER is not installed): migrate is refused with the reason before anything starts, the
    host runs on, and query-migrate lists it."""
    h = start_host("--ram", "16M", env={"MIG_DIRTY_TRACKER": "hash", "MIG_DISABLED_PLUGINS": "mig-tracker-hash"})
    c = await connect(h.sock)
    [reason] = (await c.execute("query-migrate"))["blocked-reasons"]
    assert reason.startswith("dirty tracking is not available: ") and "'hash'" in reason, reason
    assert await qmp_error(c.execute("migrate", {"uri": f"unix:{tmp_path}/nowhere.sock"})) == reason
    assert await c.execute("query-migrate") == {"blocked-reasons": [reason]}  # nothing started
    assert (await c.execute("query-status"))["status"] == "running"
    await c.disconnect()


def test_an_embedded_machine_no_tracker_serves_is_blocked_at_migrate():
    """Host software that never started tracking: migrate finds that no tracker serves the machine (no
    host marks, the plugins hidden) and refuses with mig's blocker instead of failing in setup."""
    registry = PluginRegistry(disabled={"mig-tracker-hash", "mig-tracker-uffd-wp"})
    m = Machine(registry=registry)
    m.add_ram("ram0", 1 << 20)
    src = MigrationManager(m)
    transport = LoopbackTransport()
    with pytest.raises(QMPError, match="^dirty tracking is not available: no dirty tracker works here: ") as e:
        src.migrate_with(transport, transport.address())
    assert "host: the host does not report its writes with mark_dirty()" in e.value.desc
    assert src.source.state is MigrationStatus.NONE
    assert to_qmp(src.query_migrate()) == {"blocked-reasons": [e.value.desc]}


def test_blockers_refuse_until_removed_and_unmigratable_devices_block():
    src = MigrationManager(machine(RunState.RUNNING))
    blockers = src.machine.blockers
    first = blockers.add("snapshotting the log", modes=[MigMode.CPR_REBOOT])
    assert src.machine.blockers.error(MigMode.NORMAL) is None  # it blocks cpr-reboot only
    assert to_qmp(src.query_migrate()) == {}
    second = blockers.add("the log is being compacted")
    assert to_qmp(src.query_migrate()) == {"blocked-reasons": ["the log is being compacted"]}
    transport = LoopbackTransport()
    with pytest.raises(QMPError, match="^the log is being compacted$"):
        src.migrate_with(transport, transport.address())
    assert src.source.state is MigrationStatus.NONE  # nothing started
    src.machine.add_device(Passthrough())
    with pytest.raises(QMPError, match="^State blocked by non-migratable device 'passthrough0'$"):
        src.migrate_with(transport, transport.address())
    assert to_qmp(src.query_migrate())["blocked-reasons"] == ["non-migratable device: passthrough0",
                                                                "the log is being compacted"]
    src.machine.devices.unregister(src.machine.devices.get("passthrough0", 0))
    blockers.remove(second)
    blockers.remove(first)
    blockers.remove(first)  # twice: nothing happens
    assert to_qmp(src.query_migrate()) == {}
    dst = MigrationManager(machine(RunState.INMIGRATE))
    assert migrate_in_process(src, dst) is MigrationStatus.COMPLETED, src.error_desc


def test_a_blocker_during_a_migration_is_refused_unless_forced_then_the_migration_fails():
    src, dst = MigrationManager(machine(RunState.RUNNING)), MigrationManager(machine(RunState.INMIGRATE))
    # 1 MB/s: the 8 MiB take eight seconds, so the blockers below arrive while it runs on any machine
    src.migrate_set_parameters(from_qmp(MigrateSetParameters, {"max-bandwidth": 1_000_000}))
    transport = LoopbackTransport()
    dst.migrate_incoming_with(transport, transport.address(), exit_on_error=False)
    src.migrate_with(transport, transport.address())
    assert src.source.wait_for({MigrationStatus.ACTIVE}, 30)
    with pytest.raises(BlockerRefused, match=r"^disallowing migration blocker \(migration/snapshot in progress\) "
                                             r"for: a passthrough device appeared$"):
        src.machine.blockers.add("a passthrough device appeared")
    assert src.machine.blockers.reasons(MigMode.NORMAL) == [] and src.source.state is MigrationStatus.ACTIVE
    src.machine.blockers.add("a passthrough device appeared", force=True)
    assert src.source.wait_for({MigrationStatus.FAILED}, 30), src.source.state
    assert src.error_desc == "a passthrough device appeared"
    assert src.machine.run.state is RunState.RUNNING  # the source carries on
    assert to_qmp(src.query_migrate())["blocked-reasons"] == ["a passthrough device appeared"]
    wait_until(lambda: dst.destination.state is MigrationStatus.FAILED, timeout=30)
