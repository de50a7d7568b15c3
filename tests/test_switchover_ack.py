"""switchover-ack end to end: a destination device that withholds its ack holds the source in ``active``.

The in-process test migrates two machines over a real TCP socket through the manager's own commands
(the device's approval is a Python call, so both machines live in this process); the others drive two
``mig run`` hosts with ``qemu.qmp``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from mig_core.control.manager import MigrationManager
from mig_core.machine.device import Device
from mig_core.machine.machine import Machine
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.commands import MigrateArgs, MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus as S
from mig_core.testing import connect, wait_for_status, wait_until

CAPS = ("return-path", "switchover-ack")
WL = ("--ram", "8M", "--ram-fill", "half", "--dirty-rate", "1M")


class Warmup(Device):
    """A device whose destination twin needs time before the switchover (a cache to warm, say): it
    approves only when ``ready`` is set."""

    id = "warmup"

    def __init__(self) -> None:
        self.value = 0
        self.ready = threading.Event()
        self.approved_at: S | None = None
        self._approve: Any = None

    def save_state(self) -> Any:
        return self.value

    def load_state(self, state: Any, version: int) -> None:
        self.value = state

    def switchover_ack_needed(self, approve: Any) -> bool:
        def wait_then_approve() -> None:
            self.ready.wait(120)
            approve()
        threading.Thread(target=wait_then_approve, daemon=True).start()
        return True


def _caps(*names: str) -> MigrateSetCapabilitiesArgs:
    return from_qmp(MigrateSetCapabilitiesArgs,
                    {"capabilities": [{"capability": c, "state": True} for c in names]})


def test_a_withheld_ack_holds_the_source_in_active_until_the_device_approves():
    src_m, dst_m = Machine(runstate=RunState.RUNNING), Machine(runstate=RunState.INMIGRATE)
    for m in (src_m, dst_m):
        m.add_ram("ram0", 2 << 20)
    src_dev, dst_dev = Warmup(), Warmup()
    src_dev.value = 42
    src_m.add_device(src_dev)
    dst_m.add_device(dst_dev)
    src_m.blocks[0].array[: 1 << 20] = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    src_m.mark_pages("ram0", np.arange(src_m.blocks[0].npages))
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    try:
        for mgr in (src, dst):
            mgr.migrate_set_capabilities(_caps(*CAPS))
        dst.migrate_incoming(MigrateIncomingArgs(uri="tcp:127.0.0.1:0"))
        (addr,) = dst.query_migrate().socket_address
        src.migrate(MigrateArgs(uri=f"tcp:127.0.0.1:{addr.value.port}"))
        out = src.outgoing
        assert out is not None
        # everything was sent long ago; the source keeps iterating, waiting for the ack
        wait_until(lambda: sum(p.switchover_ack_wait_ms for p in out.stats().passes) >= 500
                   or src.source.state not in (S.SETUP, S.ACTIVE), timeout=60)
        assert src.source.state is S.ACTIVE, src.error_desc
        assert src_m.run.state is RunState.RUNNING
        assert dst.destination.state is S.ACTIVE and dst_m.run.state is RunState.INMIGRATE
        incoming = dst.incoming
        assert incoming is not None and incoming.switchover_approvals is not None
        assert incoming.switchover_approvals.waiting == ["warmup/0"]
        passes_before = len(out.stats().passes)
        dst_dev.ready.set()
        assert src.source.wait_for({S.COMPLETED, S.FAILED}, 60)
        assert src.source.state is S.COMPLETED, src.error_desc
        assert dst.destination.wait_for({S.COMPLETED, S.FAILED}, 60)
        assert dst.destination.state is S.COMPLETED, dst.error_desc
        assert dst_dev.value == 42
        assert np.array_equal(src_m.blocks[0].array, dst_m.blocks[0].array)
        passes = out.stats().passes
        assert len(passes) >= passes_before >= 2
        # the passes that waited say so; the wait ended with the ack
        assert sum(p.switchover_ack_wait_ms for p in passes) >= 500
    finally:
        dst_dev.ready.set()
        src_m.close()
        dst_m.close()


async def test_no_device_waiting_acks_at_once(start_host, tmp_path):
    """Both sides on, no device needs time: the destination acks when the return path opens."""
    s = start_host(*WL, name="src")
    d = start_host(*WL, "--incoming", "tcp:127.0.0.1:0", *[f"--cap={c}=on" for c in CAPS], name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        await src.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": c, "state": True} for c in CAPS]})
        (addr,) = (await dst.execute("query-migrate"))["socket-address"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        assert any(e.get("event") == "switchover_ack_sent" for e in d.log_events())
        assert any(e.get("event") == "switchover_ack_received" for e in s.log_events())
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_a_destination_without_the_capability_refuses_instead_of_hanging(start_host, tmp_path):
    s = start_host(*WL, name="src")
    d = start_host(*WL, "--incoming", "defer", "--cap=return-path=on", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        await src.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": c, "state": True} for c in CAPS]})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
        (addr,) = (await dst.execute("query-migrate"))["socket-address"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        # the destination refuses at CONFIG, before the return path opens: the source sees the connection
        # close, on its return path or on a send, whichever comes first
        assert info["status"] == "failed" and (info["error-desc"].startswith("return path: ")
                                               or info["error-desc"].startswith("send failed: ")), info
        dinfo = await wait_for_status(dst, {"failed"})
        assert dinfo["error-desc"] == ("load of migration failed: the source waits for this host's switchover ack, "
                                       "but capability switchover-ack is off here: enable it on both sides")
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await src.disconnect()
        await dst.disconnect()
