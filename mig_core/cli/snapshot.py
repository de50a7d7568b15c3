"""``mig snapshot``: list, save, load and delete a running host's snapshots (over QMP, as jobs)."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import sys
from typing import Any

import click
from qemu.qmp import ExecuteError
from rich.console import Console
from rich.table import Table

from mig_core.cli.operator import connect_monitor


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@click.group("snapshot")
def snapshot_cmd() -> None:
    """Snapshots of a running host: list them, or save, load and delete one (snapshot-* jobs)."""


@snapshot_cmd.command("list")
@click.argument("socket")
@click.option("--json", "as_json", is_flag=True, help="Print x-query-snapshots' reply as JSON.")
def list_cmd(socket: str, as_json: bool) -> None:
    """Every snapshot on every storage node: tag, when, the RAM and VM state it holds, its own storage."""

    async def go() -> list[dict[str, Any]]:
        client = await connect_monitor(socket)
        try:
            return await client.execute("x-query-snapshots")  # type: ignore[return-value]
        finally:
            await client.disconnect()

    snaps = asyncio.run(go())
    console = Console()
    if as_json:
        import json

        console.print_json(json.dumps(snaps))
        return
    if not snaps:
        console.print("no snapshots")
        return
    table = Table("node", "tag", "date", "RAM", "VM state", "own storage")
    for s in snaps:
        when = datetime.datetime.fromtimestamp(s["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(s["node"], s["name"], when, _size(s["ram-size"]), _size(s["vm-state-size"]), _size(s["size"]))
    console.print(table)


_job_ids = itertools.count()


async def _run_job(socket: str, command: str, arguments: dict[str, Any]) -> str | None:
    """Run one snapshot job to its end; its error (None if it succeeded)."""
    client = await connect_monitor(socket)
    job_id = f"mig-cli-{command}-{next(_job_ids)}"
    try:
        await client.execute(command, {"job-id": job_id, **arguments})
        while True:
            jobs: list[dict[str, Any]] = await client.execute("query-jobs")  # type: ignore[assignment]
            job = next((j for j in jobs if j["id"] == job_id), None)
            if job is not None and job["status"] == "concluded":
                await client.execute("job-dismiss", {"id": job_id})
                return job.get("error")
            await asyncio.sleep(0.05)
    except ExecuteError as e:
        return e.error.error.desc
    finally:
        await client.disconnect()


def _finish(error: str | None, done: str) -> None:
    if error is not None:
        click.echo(f"mig: {error}", err=True)
        sys.exit(1)
    click.echo(done)


_NODE = click.option("--node", "nodes", multiple=True, default=("snap0",), show_default=True,
                     help="A storage node (repeatable); the first holds the VM state.")


@snapshot_cmd.command("save")
@click.argument("socket")
@click.argument("tag")
@_NODE
def save_cmd(socket: str, tag: str, nodes: tuple[str, ...]) -> None:
    """Save the machine as TAG (snapshot-save; the machine stops meanwhile)."""
    _finish(asyncio.run(_run_job(socket, "snapshot-save", {"tag": tag, "vmstate": nodes[0],
                                                             "devices": list(nodes)})), f"saved {tag}")


@snapshot_cmd.command("load")
@click.argument("socket")
@click.argument("tag")
@_NODE
def load_cmd(socket: str, tag: str, nodes: tuple[str, ...]) -> None:
    """Restore the machine to TAG (snapshot-load)."""
    _finish(asyncio.run(_run_job(socket, "snapshot-load", {"tag": tag, "vmstate": nodes[0],
                                                             "devices": list(nodes)})), f"loaded {tag}")


@snapshot_cmd.command("delete")
@click.argument("socket")
@click.argument("tag")
@_NODE
def delete_cmd(socket: str, tag: str, nodes: tuple[str, ...]) -> None:
    """Delete TAG (snapshot-delete)."""
    _finish(asyncio.run(_run_job(socket, "snapshot-delete", {"tag": tag, "devices": list(nodes)})),
            f"deleted {tag}")
