"""``mig run``: a host process that serves QMP (the reference host grows with the machine model)."""

from __future__ import annotations

import asyncio
import signal
import sys

import click
import structlog

from mig_core.manager import MigrationManager
from mig_core.qmp.address import parse_monitor_address
from mig_core.qmp.server import QMPServer
from mig_core.schema.common import RunState

log = structlog.get_logger("mig.run")


def _monitor_address(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[object]:
    try:
        return [parse_monitor_address(v) for v in values]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--qmp", "qmp", multiple=True, required=True, callback=_monitor_address,
              metavar="unix:PATH|tcp:HOST:PORT", help="Serve QMP here (repeatable).")
@click.option("-S", "paused", is_flag=True, help="Start paused (prelaunch); a destination stays paused after loading.")
@click.option("--incoming", metavar="URI|defer", help="Wait for an incoming migration ('defer': migrate-incoming).")
def run(qmp: list[object], paused: bool, incoming: str | None) -> None:
    """Run a host process serving QMP until 'quit' or a signal."""
    if incoming is not None:
        state = RunState.INMIGRATE
    else:
        state = RunState.PRELAUNCH if paused else RunState.RUNNING
    manager = MigrationManager(runstate=state)
    if paused:
        manager.run.autostart = False
    asyncio.run(_serve(manager, qmp))


async def _serve(manager: MigrationManager, addresses: list[object]) -> None:
    server = QMPServer(manager)
    for addr in addresses:
        bound = await server.listen(addr)  # type: ignore[arg-type]
        click.echo(f"mig: QMP listening on {bound}", file=sys.stdout)
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.shutdown)
    await server.serve_until_shutdown()
    log.info("mig_run_exit")
