"""``mig run``: the reference host — RAM, a dirtying workload, one device — serving QMP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import click
import structlog

from mig_core.block.node import BlockNode
from mig_core.cli.options import parse_caps, parse_object, parse_params
from mig_core.control.manager import MigrationManager
from mig_core.errors import PluginNotFound, QMPError
from mig_core.ext import snapshot_backend
from mig_core.ext.dirty_tracker import GROUP as TRACKERS
from mig_core.machine.machine import Machine
from mig_core.machine.reference_host import (
    CounterDevice,
    FailoverPrimary,
    RamSpec,
    Workload,
    fill,
    parse_ram,
    parse_size,
)
from mig_core.machine.reference_output import LineSink, OutputDevice, parse_output
from mig_core.qapi.visitor import QapiInputError, from_qmp
from mig_core.qmp.address import parse_monitor_address
from mig_core.qmp.server import QMPServer
from mig_core.schema.commands import MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigMode
from mig_core.schema.objects import ObjectOptions
from mig_core.schema.parameters import MigrateSetParameters

log = structlog.get_logger("mig.run")


def _monitor_address(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[object]:
    try:
        return [parse_monitor_address(v) for v in values]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _rams(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[RamSpec]:
    try:
        return [parse_ram(v, i) for i, v in enumerate(values or ("64M",))]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _rates(_ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [parse_size(v, "dirty rate") for v in value.split(",")]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--qmp", "qmp", multiple=True, required=True, callback=_monitor_address,
              metavar="unix:PATH|tcp:HOST:PORT", help="Serve QMP here (repeatable).")
@click.option("--ram", "rams", multiple=True, callback=_rams,
              metavar="[NAME=]SIZE[,page-size=N][,backing=B][,path=P][,fd=N]",
              help="A RAM block (repeatable; default pc.ram=64M; backing anonymous with huge pages, memfd, or file "
                   "with path=P; memfd with fd=N adopts a memfd passed in). K, M, G are powers of 1024.")
@click.option("--ram-fill", type=click.Choice(["zero", "random", "half", "text"]), default="zero",
              help="Initial RAM contents: never touched, random, half random, or text-like (with --incoming: "
                   "stale contents the migration replaces).")
@click.option("--mem-prealloc", is_flag=True, help="Fault every RAM page in at start.")
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, help="vCPU threads running the workload.")
@click.option("--dirty-rate", default="0", callback=_rates, metavar="RATE|R1,R2,...",
              help="Bytes per second the vCPUs dirty, all together, or one rate per vCPU (suffixes K, M, G).")
@click.option("-S", "paused", is_flag=True, help="Start paused; a destination stays paused after loading.")
@click.option("--incoming", metavar="URI|defer", help="Wait for an incoming migration ('defer': migrate-incoming).")
@click.option("--uuid", help="The machine's uuid (validate-uuid compares it).")
@click.option("--postcopy-prefetch", type=click.IntRange(0, 4096), default=0, metavar="PAGES",
              help="Postcopy source: pages sent after each page the destination asks for (default 0: the "
                   "background stream continues after it instead).")
@click.option("--dirty-tracker", "dirty_tracker", metavar="NAME",
              help="The dirty tracker (an installed mig_core.dirty_trackers plugin: uffd-wp, hash, host ...) "
                   "instead of the best one that works here. dirty-limit and calc-dirty-rate's dirty-ring "
                   "mode need 'host', which attributes writes to vCPUs.")
@click.option("--cap", "caps", multiple=True, metavar="NAME=on|off",
              help="Set a migration capability at start, before an --incoming migration begins (QEMU's "
                   "-global migration.NAME=on).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Set a migration parameter at start, before an --incoming migration begins.")
@click.option("--flight-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write every migration's flight record (per pass and per second) as JSON lines in DIR.")
@click.option("--no-flight-record", is_flag=True, help="Keep no flight record (x-query-migration-record is "
              "then empty).")
@click.option("--snapshot-dir", "snapshot_dirs", multiple=True, metavar="DIR[,node-name=N][,backend=B]",
              help="A storage node for snapshot-save/-load (repeatable): snapshots kept in DIR by the snapshot "
                   "backend B (default 'dir'; 'dedup' shares pages between snapshots), node name N (default "
                   "snap0, snap1, ...).")
@click.option("--migration-blocker", "blockers", multiple=True, metavar="REASON",
              help="Register a migration blocker with this reason (repeatable): migrate and snapshot-save are "
                   "refused with it, query-migrate lists it in blocked-reasons.")
@click.option("--failover-primary", "failover", multiple=True, metavar="ID[,unplug-ms=N]",
              help="A failover primary device (a passthrough NIC beside a standby, as QEMU's virtio-net failover): "
                   "a migration first has the guest unplug it, which takes N ms (default 500), waiting in "
                   "wait-unplug; a failed or cancelled migration plugs it back (repeatable).")
@click.option("--object", "objects", multiple=True, metavar="TYPE,id=ID[,PROP=VALUE...]|JSON",
              help="Create an object as object-add does, before --param and --incoming use it (repeatable): "
                   "tls-creds-x509,id=tls0,dir=DIR,endpoint=server; authz-simple,id=a,identity=DN; "
                   "authz-list in the JSON form (its rules are a list).")
@click.option("--tcp-user-timeout", type=click.FloatRange(0.001, 3600), default=30.0, metavar="SECONDS",
              help="How long a migration's TCP connection may go unacknowledged before it counts as dead "
                   "(a dead link fails the migration after this long).")
@click.option("--output", "output", metavar="PATH[,rate=N][,diverge=P]",
              help="Emit N messages a second that follow from the machine's state (100 by default; a share P "
                   "of them mixes in randomness); released ones are appended to PATH, one per line (under "
                   "COLO only once both sides agree).")
@click.option("--drive", "drives", multiple=True,
              metavar="node-name=N,file=PATH[,size=S][,write-rate=R][,migrate=on]",
              help="A block node backed by PATH (created or grown to S bytes): block-dirty-bitmap-* track what is "
                   "written to it; the workload writes R bytes per second to it (default 0) while the machine "
                   "runs; with migrate=on its contents migrate with the machine (storage the destination does "
                   "not share; give the destination the node with migrate=on too) (repeatable).")
def run(qmp: list[object], rams: list[RamSpec], ram_fill: str, mem_prealloc: bool, vcpus: int, dirty_rate: list[int],
        paused: bool, incoming: str | None, uuid: str | None, postcopy_prefetch: int, dirty_tracker: str | None,
        caps: tuple[str, ...], params: tuple[str, ...], flight_dir: str | None, no_flight_record: bool,
        snapshot_dirs: tuple[str, ...], blockers: tuple[str, ...], failover: tuple[str, ...],
        tcp_user_timeout: float, drives: tuple[str, ...], objects: tuple[str, ...], output: str | None) -> None:
    """Run the reference host serving QMP until 'quit' or a signal."""
    if len(dirty_rate) not in (1, vcpus):  # type: ignore[arg-type]
        raise click.BadParameter(f"give one rate or {vcpus} (one per vCPU)", param_hint="--dirty-rate")
    if incoming is not None:
        state = RunState.INMIGRATE
    else:
        state = RunState.PRELAUNCH if paused else RunState.RUNNING
    try:
        machine = Machine(runstate=state, uuid=uuid)
    except ValueError:
        raise click.BadParameter(f"'{uuid}' is not a UUID", param_hint="--uuid") from None
    machine.host_marks_writes = True  # the workload reports its writes, so the host tracker may serve
    if dirty_tracker is not None:
        installed = machine.registry.names(TRACKERS)
        if dirty_tracker not in installed:
            raise click.BadParameter(f"unknown dirty tracker '{dirty_tracker}' (installed: "
                                     f"{', '.join(sorted(installed))})", param_hint="--dirty-tracker")
        machine.tracker_name = dirty_tracker
    machine.attribution_hint = "mig run gets it with --dirty-tracker host"
    for spec in rams:
        try:
            machine.add_ram(spec.name, spec.size, page_size=spec.page_size, backing=spec.backing, path=spec.path,
                             prealloc=mem_prealloc, fd=spec.fd)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--ram") from None
    drive_rates = [_add_drive(machine, text) for text in drives]
    for i, spec_text in enumerate(snapshot_dirs):
        _add_snapshot_node(machine, spec_text, i)
    if paused:
        machine.run.autostart = False
    rates: list[float] = [float(r) for r in dirty_rate] if len(dirty_rate) == vcpus else [dirty_rate[0] / vcpus] * vcpus
    device = CounterDevice(vcpus, sum(dirty_rate))
    machine.add_device(device)
    for text in failover:
        machine.add_device(_failover_primary(machine, text))
    output_device = None
    if output is not None:
        try:
            out_spec = parse_output(output)
            machine.output.set_sink(LineSink(out_spec.path))
        except (ValueError, OSError) as e:
            raise click.BadParameter(str(e), param_hint="--output") from None
        output_device = OutputDevice(out_spec.rate, out_spec.diverge)
        machine.add_device(output_device)
    for reason in blockers:
        if not reason.strip():
            raise click.BadParameter("a migration blocker needs a reason", param_hint="--migration-blocker")
        machine.blockers.add(reason)
    manager = MigrationManager(machine)
    manager.postcopy_prefetch_pages = postcopy_prefetch
    manager.tcp_user_timeout = tcp_user_timeout
    if flight_dir is not None:
        manager.recorder.directory = Path(flight_dir)
    manager.recorder.enabled = not no_flight_record
    for text in objects:
        try:
            manager.object_add(from_qmp(ObjectOptions, parse_object(text)))
        except (QMPError, QapiInputError) as e:
            raise click.BadParameter(e.desc if isinstance(e, QMPError) else str(e), param_hint="--object") from None
    try:
        if caps:
            manager.migrate_set_capabilities(from_qmp(MigrateSetCapabilitiesArgs, {"capabilities": parse_caps(caps)}))
        if params:
            manager.migrate_set_parameters(from_qmp(MigrateSetParameters, parse_params(params)))
    except (QMPError, QapiInputError) as e:
        raise click.BadParameter(e.desc if isinstance(e, QMPError) else str(e),
                                 param_hint="--cap/--param") from None
    try:
        log.info("dirty_tracker", tracker=machine.tracker_class().name)  # chosen now, not at migrate time
    except (ValueError, PluginNotFound) as e:
        if dirty_tracker is not None:  # asked for by name: it must work
            raise click.BadParameter(str(e), param_hint="--dirty-tracker") from None
        log.warning("no_dirty_tracker", error=str(e))
    manager.transports.classes()  # load transport plugins now, not inside a migration's setup
    if incoming is not None:
        # before anything writes RAM: the load then knows which preallocated pages are still zero unread
        machine.watch_for_writes()
    # a destination may start with stale contents too: what the source does not send is dropped
    fill(machine, ram_fill)
    if incoming is None:
        # arm the tracker now: migrations then start without that cost (or mig blocks them, saying why)
        if not machine.start_tracking():
            log.warning("dirty_tracking_unavailable", blocked_reasons=machine.blockers.reasons(MigMode.NORMAL))
    workload = Workload(machine, rates, device, drive_rates, output_device)

    def incoming_failed(error: str, exit_on_error: bool) -> None:
        if exit_on_error:
            print(f"mig: {error}", file=sys.stderr, flush=True)
            os._exit(1)

    manager.on_incoming_failed = incoming_failed
    if incoming not in (None, "defer"):
        try:
            manager.migrate_incoming(MigrateIncomingArgs(uri=incoming))
        except QMPError as e:
            raise click.ClickException(f"-incoming {incoming}: {e.desc}") from None
    workload.start()
    # a destination may run with pages missing (postcopy): its QMP is served through a front process that
    # keeps answering while a page fault stops this one
    asyncio.run(_serve(manager, qmp, front=incoming is not None))
    workload.stop.set()
    if machine.run.state is RunState.RUNNING:  # parked vCPUs write nothing; running ones finish their tick
        for t in workload.threads:
            t.join(2)
    for node in machine.block_nodes.values():
        node.close()  # persistent dirty bitmaps are stored, marked cleanly closed


def _add_drive(machine: Machine, text: str) -> tuple[BlockNode, float]:
    """``--drive node-name=N,file=PATH[,size=S][,write-rate=R]``: the node, and what the workload writes to it."""
    opts: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in ("node-name", "file", "size", "write-rate", "migrate"):
            raise click.BadParameter(f"'{item}' is not node-name=, file=, size=, write-rate= or migrate=",
                                     param_hint="--drive")
        opts[key] = value
    if "node-name" not in opts or "file" not in opts:
        raise click.BadParameter("a drive needs node-name= and file=", param_hint="--drive")
    try:
        size = parse_size(opts["size"], "size") if "size" in opts else None
        rate = float(parse_size(opts.get("write-rate", "0"), "write-rate"))
        if opts.get("migrate", "off") not in ("on", "off"):
            raise ValueError(f"migrate={opts['migrate']}: on or off")
        node = BlockNode(opts["node-name"], opts["file"], size)
        machine.add_block_node(node, migrate=opts.get("migrate") == "on")
    except (ValueError, OSError) as e:
        raise click.BadParameter(str(e), param_hint="--drive") from None
    return node, rate


def _failover_primary(machine: Machine, text: str) -> FailoverPrimary:
    """``--failover-primary ID[,unplug-ms=N]``."""
    device_id, *rest = text.split(",")
    unplug_ms = 500
    for item in rest:
        key, eq, value = item.partition("=")
        if key != "unplug-ms" or not eq or not value.isdigit():
            raise click.BadParameter(f"'{item}' is not unplug-ms=N", param_hint="--failover-primary")
        unplug_ms = int(value)
    if not device_id:
        raise click.BadParameter("a failover primary needs an id", param_hint="--failover-primary")
    return FailoverPrimary(machine, device_id, unplug_ms)


def _add_snapshot_node(machine: Machine, text: str, index: int) -> None:
    """``--snapshot-dir DIR[,node-name=N][,backend=B][,OPTION=V...]``: a node of backend B on DIR."""
    path, *rest = text.split(",")
    options = {"dir": path}
    node_name, backend = f"snap{index}", "dir"
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--snapshot-dir")
        if key == "node-name":
            node_name = value
        elif key == "backend":
            backend = value
        else:
            options[key] = value
    try:
        cls = snapshot_backend.load(machine.registry, backend)
        machine.add_snapshot_node(cls(node_name, options))
    except (ValueError, PluginNotFound) as e:
        raise click.BadParameter(str(e), param_hint="--snapshot-dir") from None


async def _serve(manager: MigrationManager, addresses: list[object], front: bool) -> None:
    server = QMPServer(manager, front=front)
    for addr in addresses:
        bound = await server.listen(addr)  # type: ignore[arg-type]
        click.echo(f"mig: QMP listening on {bound}", file=sys.stdout)
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.shutdown)
    await server.serve_until_shutdown()
    log.info("mig_run_exit")

