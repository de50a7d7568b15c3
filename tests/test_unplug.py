"""Unplug before migration (wait-unplug, UNPLUG_PRIMARY, re-plug on cancel) and VFIO-style statistics.

The unplug tests drive ``mig run --failover-primary`` hosts through ``qemu.qmp``; the VFIO test migrates
two machines in one process over a real TCP socket (its device is Python code handed to the machine).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import msgpack
from qemu.qmp import EventListener

from mig_core.control.manager import MigrationManager
from mig_core.machine.device import Device, PendingState
from mig_core.machine.machine import Machine
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.commands import MigrateArgs, MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus as S
from mig_core.testing import connect, wait_for_status

WL = ("--ram", "8M", "--ram-fill", "half", "--dirty-rate", "1M")
EVENTS = {"capabilities": [{"capability": "events", "state": True}]}


async def _pair(start_host, unplug_ms: int):
    s = start_host(*WL, f"--failover-primary=hostdev0,unplug-ms={unplug_ms}", name="src")
    d = start_host(*WL, "--incoming", "tcp:127.0.0.1:0", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    await src.execute("migrate-set-capabilities", EVENTS)
    (addr,) = (await dst.execute("query-migrate"))["socket-address"]
    return s, src, dst, f"tcp:127.0.0.1:{addr['port']}"


async def test_the_source_waits_in_wait_unplug_until_the_primary_is_gone(start_host, tmp_path):
    s, src, dst, uri = await _pair(start_host, unplug_ms=600)
    listener = EventListener(("MIGRATION", "UNPLUG_PRIMARY"))
    src.register_listener(listener)
    try:
        await src.execute("migrate", {"uri": uri})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert info["setup-time"] >= 600  # the unplug wait is part of setup, as in QEMU
        seen = [(e["event"], e["data"]) for e in listener.clear()]
        statuses = [d["status"] for name, d in seen if name == "MIGRATION"]
        assert statuses[:3] == ["setup", "wait-unplug", "active"], statuses
        # the unplug is announced while the source waits, before it goes active
        unplug = seen.index(("UNPLUG_PRIMARY", {"device-id": "hostdev0"}))
        assert seen.index(("MIGRATION", {"status": "wait-unplug"})) < unplug < \
            seen.index(("MIGRATION", {"status": "active"}))
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_a_cancel_in_wait_unplug_plugs_the_primary_back_and_a_new_migration_works(start_host, tmp_path):
    s, src, dst, uri = await _pair(start_host, unplug_ms=2000)
    try:
        await src.execute("migrate", {"uri": uri})
        info = await wait_for_status(src, {"wait-unplug"})
        assert info == {"status": "wait-unplug"}  # QEMU shows nothing else in wait-unplug
        await src.execute("migrate_cancel")
        assert (await wait_for_status(src, {"cancelled"}, timeout=60))["status"] == "cancelled"
        # the unplug under way was let finish, then the device came back
        events = [e.get("event") for e in s.log_events()]
        assert events.index("unplugged") < events.index("replugged")
        assert (await src.execute("query-status"))["status"] == "running"
        # the first destination failed with the cancelled stream (as QEMU's does); to a new one, a new
        # migration unplugs the device again and completes
        d2 = start_host(*WL, "--incoming", "tcp:127.0.0.1:0", name="dst")
        dst2 = await connect(d2.sock, "dst2")
        (addr,) = (await dst2.execute("query-migrate"))["socket-address"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert [e.get("event") for e in s.log_events()].count("unplugged") == 2
        assert (await wait_for_status(dst2, {"completed", "failed"}))["status"] == "completed"
        await dst2.disconnect()
    finally:
        await src.disconnect()
        with contextlib.suppress(EOFError):  # the first destination exited when its load failed
            await dst.disconnect()


class Passthrough(Device):
    """A device that streams its own state (as a VFIO device does): 1 MiB in 64 KiB chunks, then a
    small final state."""

    id = "passthrough"
    vfio = True

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.sent = 0
        self.lock = threading.Lock()

    def state_pending(self) -> PendingState:
        return PendingState(must_precopy=len(self.data) - self.sent)

    def save_iterate(self, max_bytes: int) -> bytes | None:
        with self.lock:
            if self.sent >= len(self.data):
                return None
            n = min(max_bytes, 64 << 10, len(self.data) - self.sent)
            chunk = bytes(self.data[self.sent:self.sent + n])
            self.sent += n
            return chunk

    def save_state(self) -> Any:
        return b"final"

    def load_iterate(self, chunk: bytes) -> None:
        self.data += chunk

    def load_state(self, state: Any, version: int) -> None:
        assert state == b"final"


def test_vfio_statistics_count_what_such_devices_sent():
    src_m, dst_m = Machine(runstate=RunState.RUNNING), Machine(runstate=RunState.INMIGRATE)
    for m in (src_m, dst_m):
        m.add_ram("ram0", 1 << 20)
    payload = bytes(range(256)) * 4096
    src_dev, dst_dev = Passthrough(payload), Passthrough(b"")
    src_m.add_device(src_dev)
    dst_m.add_device(dst_dev)
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    try:
        caps = from_qmp(MigrateSetCapabilitiesArgs, {"capabilities": [{"capability": "return-path", "state": True}]})
        src.migrate_set_capabilities(caps)
        dst.migrate_set_capabilities(caps)
        dst.migrate_incoming(MigrateIncomingArgs(uri="tcp:127.0.0.1:0"))
        (addr,) = dst.query_migrate().socket_address
        src.migrate(MigrateArgs(uri=f"tcp:127.0.0.1:{addr.value.port}"))
        assert src.source.wait_for({S.COMPLETED, S.FAILED}, 60)
        assert src.source.state is S.COMPLETED, src.error_desc
        assert dst.destination.wait_for({S.COMPLETED, S.FAILED}, 60)
        assert bytes(dst_dev.data) == payload
        info = src.query_migrate()
        assert info.vfio.transferred == len(payload) + len(msgpack.packb(b"final", use_bin_type=True))
    finally:
        src_m.close()
        dst_m.close()


async def test_no_vfio_statistics_without_such_a_device(start_host, tmp_path):
    s = start_host(*WL, name="src")
    d = start_host(*WL, "--incoming", "tcp:127.0.0.1:0", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        (addr,) = (await dst.execute("query-migrate"))["socket-address"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed" and "vfio" not in info, info
    finally:
        await src.disconnect()
        await dst.disconnect()
