"""``mig advise SOCKET``: ask a running host how a migration would go (x-query-migration-advice) and show it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import click
from qemu.qmp import ExecuteError
from rich.console import Console
from rich.table import Table

from mig_core.cli.operator import connect_monitor

_MB = 1e6


def _rate(bps: float) -> str:
    return f"{bps / _MB:,.0f} MB/s"


def advice_table(advice: dict[str, Any]) -> Table:
    """One row per strategy: available here, converges, total time, passes, downtime, why."""
    table = Table(title="predictions")
    for col in ("strategy", "available", "converges", "total time", "passes", "downtime", "note"):
        table.add_column(col, justify="right" if col in ("total time", "passes", "downtime") else "left")
    for p in advice["predictions"]:
        chosen = p["strategy"] == advice["recommendation"]
        table.add_row(f"[bold]{p['strategy']}[/]" if chosen else p["strategy"], "yes" if p["available"] else "no",
                      "yes" if p["converges"] else "[red]no[/]",
                      f"{p['total-time'] / 1000:.1f} s" if "total-time" in p else "-", str(p.get("passes", "-")),
                      f"{p['downtime']} ms" if "downtime" in p else "-", p.get("reason", ""))
    return table


def measurements(advice: dict[str, Any]) -> str:
    link = f", link {_rate(advice['link-bandwidth'])}" if "link-bandwidth" in advice else " (link not probed)"
    return (f"dirty rate {_rate(advice['dirty-rate'])} (writes {_rate(advice['write-rate'])}), RAM "
            f"{advice['ram-size'] / _MB:,.0f} MB ({advice['ram-to-send'] / _MB:,.0f} MB with data), bandwidth "
            f"{_rate(advice['bandwidth'])}{link}, downtime-limit {advice['downtime-limit']} ms")


@click.command("advise")
@click.argument("socket")
@click.option("--uri", help="The destination's migration URI (it must be waiting: migrate-incoming) to probe "
                            "the link; without it the link is taken to be max-bandwidth.")
@click.option("--calc-time", type=click.IntRange(200, 10000), default=1000, show_default=True, metavar="MS",
              help="How long to measure the dirty rate.")
@click.option("--json", "as_json", is_flag=True, help="Print x-query-migration-advice's reply as JSON.")
def advise_cmd(socket: str, uri: str | None, calc_time: int, as_json: bool) -> None:
    """Measure a host's dirty rate (and the link to --uri), predict total time, passes and downtime for plain
    precopy, auto-converge, dirty-limit and postcopy, and recommend one."""
    args: dict[str, Any] = {"calc-time": calc_time, **({"uri": uri} if uri else {})}

    async def go() -> int:
        client = await connect_monitor(socket)
        try:
            advice: dict[str, Any] = await client.execute("x-query-migration-advice", args)  # type: ignore[assignment]
        except ExecuteError as e:
            click.echo(f"mig advise: {e.error.error.desc}", err=True)
            return 1
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
        if as_json:
            click.echo(json.dumps(advice, indent=2))
            return 0
        console = Console()
        console.print(measurements(advice))
        console.print(advice_table(advice))
        console.print(f"[bold]recommendation: {advice['recommendation']}[/] — {advice['reason']}")
        return 0

    sys.exit(asyncio.run(go()))
