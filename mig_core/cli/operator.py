"""Operator commands: ``mig qmp``, ``mig info``, ``mig migrate``, ``mig shell`` against a running host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import click
from qemu.qmp import ExecuteError, QMPClient
from rich.console import Console

from mig_core.cli.options import parse_caps, parse_params, parse_value
from mig_core.cli.progress import follow, progress_line, summary_table
from mig_core.qmp.address import parse_monitor_address


def target_address(text: str) -> str | tuple[str, int]:
    """``unix:PATH``, ``tcp:HOST:PORT`` (as QEMU's -qmp) or a bare socket path."""
    if not text.startswith(("unix:", "tcp:")):
        return text
    try:
        addr = parse_monitor_address(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="SOCKET") from None
    return addr.path if addr.kind == "unix" else (addr.host, addr.port)


async def connect_monitor(socket: str) -> QMPClient:
    """A negotiated client of the host at ``socket`` (a click error if there is none)."""
    client = QMPClient("mig-cli")
    try:
        await client.connect(target_address(socket))
    except Exception as e:  # noqa: BLE001 - any connection failure is reported the same way
        raise click.ClickException(f"cannot connect to {socket}: {e}") from None
    return client


def _arguments(args: tuple[str, ...]) -> dict[str, Any]:
    if len(args) == 1 and args[0].lstrip().startswith("{"):
        try:
            obj = json.loads(args[0])
        except ValueError as e:
            raise click.BadParameter(f"invalid JSON arguments: {e}") from None
        return obj
    out: dict[str, Any] = {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise click.BadParameter(f"'{a}' is not key=value (or give one JSON object)")
        out[key] = parse_value(value)
    return out


@click.command("qmp")
@click.argument("socket")
@click.argument("command")
@click.argument("args", nargs=-1)
def qmp_cmd(socket: str, command: str, args: tuple[str, ...]) -> None:
    """Send one QMP COMMAND (arguments as one JSON object or key=value pairs) and print the reply."""
    arguments = _arguments(args)

    async def go() -> int:
        client = await connect_monitor(socket)
        try:
            reply = await client.execute(command, arguments or None)
            click.echo(json.dumps({"return": reply}, indent=2))
            return 0
        except ExecuteError as e:
            click.echo(json.dumps({"error": {"class": e.error.error.class_, "desc": e.error.error.desc}}, indent=2))
            return 1
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    sys.exit(asyncio.run(go()))


@click.command("info")
@click.argument("socket")
def info_cmd(socket: str) -> None:
    """Show query-migrate of a running host."""

    async def go() -> None:
        client = await connect_monitor(socket)
        try:
            info: dict[str, Any] = await client.execute("query-migrate")  # type: ignore[assignment]
            status = await client.execute("query-status")
        finally:
            await client.disconnect()
        console = Console()
        console.print(f"run state: {status['status']}")  # type: ignore[index]
        if not info:
            console.print("no migration has run")
            return
        console.print(progress_line(info))
        if info.get("status") in ("completed", "failed", "cancelled"):
            console.print(summary_table(info, info.get("ram", {}).get("total", 0)))
        console.print_json(json.dumps(info))

    asyncio.run(go())


@click.command("migrate")
@click.argument("socket")
@click.argument("uri")
@click.option("--cap", "caps", multiple=True, metavar="NAME=on|off", help="Set a capability first.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Set a parameter first.")
@click.option("--autopilot", is_flag=True, help="Let the autopilot steer the migration if it does not converge "
                                                "(postcopy, dirty-limit or auto-converge; mig's extension).")
def migrate_cmd(socket: str, uri: str, caps: tuple[str, ...], params: tuple[str, ...], autopilot: bool) -> None:
    """Start a migration on a running host and follow it; Ctrl-C cancels it (migrate_cancel)."""
    cap_list, param_map = parse_caps(caps), parse_params(params)

    async def go() -> int:
        client = await connect_monitor(socket)
        console = Console()
        try:
            if cap_list:
                await client.execute("migrate-set-capabilities", {"capabilities": cap_list})
            if param_map:
                await client.execute("migrate-set-parameters", param_map)
            if autopilot:
                await client.execute("x-set-migration-autopilot", {"enabled": True})
            await client.execute("migrate", {"uri": uri})
            try:
                info = await follow(client, console)
            except asyncio.CancelledError:
                await client.execute("migrate_cancel")
                console.print("cancelled (migrate_cancel sent)")
                info = await follow(client, console)
            total = info.get("ram", {}).get("total", 0)
            console.print(summary_table(info, total))
            return 0 if info.get("status") == "completed" else 1
        except ExecuteError as e:
            console.print(f"[red]{e.error.error.desc}[/]")
            return 1
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    try:
        sys.exit(asyncio.run(go()))
    except KeyboardInterrupt:
        sys.exit(130)
