"""migrate-set-capabilities: every set-time rule with QEMU's text, over QMP and on the rule table."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from qemu.qmp import ExecuteError

from mig_core.control import capabilities as caps
from mig_core.control.manager import MigrationManager
from mig_core.errors import QMPError
from mig_core.ext import replication
from mig_core.plugin.registry import PluginRegistry
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S
from mig_core.testing import Host, connect

COLO_INSTALLED = "colo" in PluginRegistry.from_environment().names(replication.GROUP)

ALL = [c.value for c in C]
ZC = "Zero copy only available for non-compressed non-TLS multifd migration"


def on(*names: str) -> dict:
    return {"capabilities": [{"capability": n, "state": True} for n in names]}


async def refused(qmp, args, desc):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("migrate-set-capabilities", args)
    assert e.value.error.error.desc == desc
    assert e.value.error.error.class_ == "GenericError"


async def reset(qmp):
    await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": n, "state": False} for n in ALL]})


async def enabled(qmp) -> set[str]:
    return {c["capability"] for c in await qmp.execute("query-migrate-capabilities") if c["state"]}


async def test_query_lists_qemus_22_and_migs_own_in_schema_order_all_off(qmp):
    caps_list = await qmp.execute("query-migrate-capabilities")
    assert [c["capability"] for c in caps_list] == ALL and len(ALL) == 23 and ALL[-1] == "x-checksums"
    assert all(c["state"] is False for c in caps_list)


@pytest.mark.parametrize("args,desc", [
    (on("postcopy-preempt"), "Postcopy preempt requires postcopy-ram"),
    (on("zero-copy-send"), ZC),
    (on("zero-copy-send", "multifd", "xbzrle"), ZC),
    (on("switchover-ack"), "Capability 'switchover-ack' requires capability 'return-path'"),
    (on("dirty-limit", "auto-converge"), "dirty-limit conflicts with auto-converge either of then available currently"),
    (on("dirty-limit"), "dirty-limit requires per-vCPU dirty page attribution "
                        "(the 'host' dirty tracker or vCPU threads that report their writes); "
                        "mig run gets it with --dirty-tracker host"),
    (on("multifd", "xbzrle"), "Multifd is not compatible with xbzrle"),
    (on("mapped-ram", "xbzrle"), "Mapped-ram migration is incompatible with xbzrle"),
    (on("mapped-ram", "postcopy-ram"), "Mapped-ram migration is incompatible with postcopy"),
    (on("x-ignore-shared", "postcopy-ram"), "Postcopy is not compatible with ignore-shared"),
    ({"capabilities": [{"capability": "foo", "state": True}]}, "Parameter 'capability' does not accept value 'foo'"),
    ({"capabilities": [{"capability": "xbzrle", "state": "yes"}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ({"capabilities": [{"capability": "xbzrle"}]}, "Parameter 'capabilities[0].state' is missing"),
    ({"capabilities": {"capability": "xbzrle"}}, "Invalid parameter type for 'capabilities', expected: array"),
    ({}, "Parameter 'capabilities' is missing"),
])
async def test_rule(qmp, args, desc):
    await refused(qmp, args, desc)
    assert await enabled(qmp) == set()  # nothing applied


async def test_x_colo_needs_the_replication_plugin(qmp):
    if COLO_INSTALLED:  # QEMU built with replication accepts it alone
        await qmp.execute("migrate-set-capabilities", on("x-colo"))
        assert await enabled(qmp) == {"x-colo"}
    else:
        await refused(qmp, on("x-colo"), "QEMU compiled without replication module can't enable COLO")


@pytest.mark.parametrize("other", [c.value for c in caps.BACKGROUND_SNAPSHOT_INCOMPATIBLE])
async def test_background_snapshot_incompatibilities(qmp, other):
    # x-colo's own rule (no replication plugin installed) comes first in QEMU's order
    expected = ("QEMU compiled without replication module can't enable COLO" if other == "x-colo"
                and not COLO_INSTALLED else f"Background-snapshot is not compatible with {other}")
    await refused(qmp, on("background-snapshot", other), expected)


async def test_accepted_combinations_and_cumulative_sets(qmp):
    for combo in [("background-snapshot",), ("zero-copy-send", "multifd"), ("return-path", "switchover-ack"),
                  ("postcopy-ram", "postcopy-preempt", "multifd"), ("postcopy-ram",), ("x-ignore-shared",),
                  ("rdma-pin-all",), ("mapped-ram", "multifd"),
                  ("background-snapshot", "events", "mapped-ram", "x-ignore-shared")]:
        await reset(qmp)
        await qmp.execute("migrate-set-capabilities", on(*combo))
        assert await enabled(qmp) == set(combo)
    await reset(qmp)
    # later entries win; empty list is fine; sets accumulate across calls
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "xbzrle", "state": True}, {"capability": "xbzrle", "state": False}]})
    await qmp.execute("migrate-set-capabilities", {"capabilities": []})
    await qmp.execute("migrate-set-capabilities", on("xbzrle"))
    await refused(qmp, on("multifd"), "Multifd is not compatible with xbzrle")
    assert await enabled(qmp) == {"xbzrle"}
    # disabling is never refused
    await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": False}]})
    assert await enabled(qmp) == set()


async def test_zero_copy_checks_current_parameters(qmp):
    await qmp.execute("migrate-set-parameters", {"multifd-compression": "zstd"})
    await refused(qmp, on("zero-copy-send", "multifd"), ZC)
    await qmp.execute("migrate-set-parameters", {"multifd-compression": "none", "tls-creds": "creds0"})
    await refused(qmp, on("zero-copy-send", "multifd"), ZC)
    await qmp.execute("migrate-set-parameters", {"tls-creds": ""})
    await qmp.execute("migrate-set-capabilities", on("zero-copy-send", "multifd"))


async def test_zero_blocks_only_warns(host, qmp):
    await qmp.execute("migrate-set-capabilities", on("zero-blocks"))
    assert await enabled(qmp) == {"zero-blocks"}
    assert any(e.get("event") == "zero_blocks_deprecated" for e in host.log_events())


async def test_postcopy_probe_on_destination_succeeds_here(start_host):
    h = start_host("--incoming", "defer")
    qmp = await connect(h.sock)
    try:
        assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        await qmp.execute("migrate-set-capabilities", on("postcopy-ram"))
        assert await enabled(qmp) == {"postcopy-ram"}
    finally:
        await qmp.disconnect()


async def test_host_without_userfaultfd_refuses_postcopy_and_background_snapshot(tmp_path):
    """The kernel refuses userfaultfd (no CAP_SYS_PTRACE, device hidden): both features are refused."""
    blocker = tmp_path / "not-a-device"
    blocker.touch()
    wrapper = ["unshare", "--mount", "sh", "-c",
               f"mount --bind {blocker} /dev/userfaultfd && exec setpriv --inh-caps=-sys_ptrace "
               "--bounding-set=-sys_ptrace \"$@\"", "sh"]
    h = Host(tmp_path, "--incoming", "defer", name="nouffd", wrapper=wrapper)
    try:
        qmp = await connect(h.sock)
        try:
            await refused(qmp, on("postcopy-ram"),
                          "Postcopy is not supported: Userfaultfd not available: Operation not permitted")
            await refused(qmp, on("background-snapshot"), "Background-snapshot is not supported by host kernel")
            assert await enabled(qmp) == set()
        finally:
            await qmp.disconnect()
    finally:
        h.stop()


# --- rules whose context (listeners, rdma, vCPU attribution) is checked on the rule table itself ---


@dataclass
class Ctx:
    runstate: RunState = RunState.RUNNING
    started: bool = False
    rdma: bool = False
    per_vcpu: bool = False
    compression: str = "none"
    tls: bool = False

    def incoming_started(self): return self.started
    def incoming_rdma(self): return self.rdma
    def multifd_compression(self): return self.compression
    def tls_enabled(self): return self.tls
    def postcopy_unsupported(self): return None
    def background_snapshot_unsupported(self): return None
    def memory_unsuitable_for_background_snapshot(self): return False
    def replication_available(self): return True
    def per_vcpu_dirty_available(self): return self.per_vcpu
    def per_vcpu_dirty_hint(self): return ""


def check(ctx, *names, old=()):
    current = caps.defaults()
    for n in old:
        current[C(n)] = True
    new = dict(current)
    for n in names:
        new[C(n)] = True
    try:
        caps.check(new, current, ctx)
    except QMPError as e:
        return e.desc
    return None


def test_rules_after_incoming_started():
    ctx = Ctx(runstate=RunState.INMIGRATE, started=True)
    assert check(ctx, "multifd") == "Multifd must be set before incoming starts"
    assert check(ctx, "postcopy-ram", "postcopy-preempt") == "Postcopy preempt must be set before incoming starts"
    # already on before the listener existed: keeping it on is fine
    assert check(ctx, "multifd", old=("multifd",)) is None
    assert check(Ctx(), "multifd") is None


def test_rules_for_rdma_incoming():
    ctx = Ctx(rdma=True)
    assert check(ctx, "xbzrle") == "RDMA and XBZRLE can't be used together"
    assert check(ctx, "multifd") == "RDMA and multifd can't be used together"
    assert check(ctx, "postcopy-ram") == "RDMA and postcopy-ram can't be used together"


def test_dirty_limit_with_attribution():
    assert check(Ctx(per_vcpu=True), "dirty-limit") is None


def test_rules_follow_qemu_order():
    # multifd+xbzrle+zero-copy: zero-copy (rule 5) is reported before multifd/xbzrle (rule 10)
    assert check(Ctx(), "multifd", "xbzrle", "zero-copy-send") == ZC
    assert check(Ctx(), "background-snapshot", "postcopy-ram", "multifd") == (
        "Background-snapshot is not compatible with postcopy-ram")


def test_no_capability_change_while_a_migration_runs():
    m = MigrationManager()
    from mig_core.qapi import from_qmp
    from mig_core.schema.commands import MigrateSetCapabilitiesArgs

    args = from_qmp(MigrateSetCapabilitiesArgs, on("events"))
    path = [S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.CANCELLING]
    old = S.NONE
    for state in path:  # drive the status along the source table, as the engine will
        assert m.source.cas(old, state)
        old = state
        with pytest.raises(QMPError, match="There's a migration process in progress"):
            m.migrate_set_capabilities(args)
    assert m.source.cas(S.CANCELLING, S.CANCELLED)
    m.migrate_set_capabilities(args)
    assert m.caps[C.EVENTS]
