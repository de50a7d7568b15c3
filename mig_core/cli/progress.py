"""Following a migration on screen: a live line of progress and a summary table, from query-migrate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qemu.qmp import QMPClient
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

FINAL = ("completed", "failed", "cancelled")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def progress_line(info: dict[str, Any]) -> Text:
    """One line: status, pass, transferred / remaining, throughput, dirty rate, expected downtime."""
    status = info.get("status", "none")
    ram = info.get("ram")
    if not ram:
        return Text(f"{status}")
    page = ram.get("page-size", 4096)
    parts = [
        f"{status:<14}",
        f"pass {ram['dirty-sync-count']}",
        f"sent {_mib(ram['transferred'])}",
        f"remaining {_mib(ram['remaining'])}",
        f"{ram['mbps']:,.0f} Mbit/s",
        f"dirtying {_mib(ram['dirty-pages-rate'] * page)}/s",
    ]
    if "expected-downtime" in info:
        parts.append(f"expected downtime {info['expected-downtime']} ms")
    if "downtime" in info:
        parts.append(f"downtime {info['downtime']} ms")
    return Text("  ".join(parts))


async def follow(client: QMPClient, console: Console, interval: float = 0.1) -> dict[str, Any]:
    """Show progress until the migration ends; return the last query-migrate reply."""
    info: dict[str, Any] = await client.execute("query-migrate")  # type: ignore[assignment]
    with Live(progress_line(info), console=console, refresh_per_second=10, transient=False) as live:
        while info.get("status") not in FINAL:
            await asyncio.sleep(interval)
            info = await client.execute("query-migrate")  # type: ignore[assignment]
            live.update(progress_line(info))
    return info


def summary_table(info: dict[str, Any], ram_size: int, wall_s: float | None = None) -> Table:
    """The summary of a finished migration."""
    t = Table(title="migration summary", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    ram = info.get("ram", {})
    total = info.get("total-time", 0)
    t.add_row("status", info.get("status", "?"))
    t.add_row("total time", f"{total} ms")
    t.add_row("downtime", f"{info.get('downtime', '-')} ms")
    t.add_row("setup time", f"{info.get('setup-time', '-')} ms")
    t.add_row("bytes transferred", f"{ram.get('transferred', 0):,}")
    t.add_row("passes (dirty syncs)", str(ram.get("dirty-sync-count", 0)))
    if total:
        t.add_row("throughput (RAM / total time)", f"{ram_size / (1 << 20) / (total / 1000):,.1f} MiB/s")
    t.add_row("zero pages (not sent)", f"{ram.get('duplicate', 0):,}")
    t.add_row("pages sent", f"{ram.get('normal', 0):,}")
    if wall_s is not None:
        t.add_row("wall clock", f"{wall_s:.2f} s")
    if info.get("error-desc"):
        t.add_row("error", info["error-desc"])
    return t


def now() -> float:
    return time.monotonic()
