"""``mig top SOCKET…``: a live dashboard of one or more hosts' migrations, redrawn a few times a second.

Per host: run state and migration status, a progress bar with the time left at the current bandwidth,
bandwidth and dirty-rate sparklines, throttle and dirty-limit, expected and actual downtime, postcopy page
requests, COLO mode, jobs (snapshots) with their progress, and the error. A host that goes away stays on
screen as disconnected, and is reconnected when it is back. Ctrl-C ends it (exit status 0).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import click
from qemu.qmp import ExecuteError, QMPClient
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mig_core.cli.operator import target_address

#: samples kept for the sparklines
HISTORY = 60
#: seconds of polls the bandwidth figure is measured over
RATE_WINDOW_S = 1.0
_BLOCKS = "▁▂▃▄▅▆▇█"
_STATUS_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow", "active": "cyan",
                 "postcopy-active": "magenta", "device": "bold red", "colo": "blue"}


def sparkline(values: collections.deque[float] | list[float], width: int = HISTORY) -> str:
    """The last ``width`` values as block characters scaled to their maximum (a figure too small for a plot)."""
    vals = list(values)[-width:]
    top = max(vals, default=0.0)
    if top <= 0:
        return _BLOCKS[0] * len(vals)
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int(v / top * (len(_BLOCKS) - 1) + 0.5))] for v in vals)


@dataclass
class HostView:
    """What the dashboard knows of one host."""

    socket: str
    client: QMPClient | None = None
    error: str | None = None
    runstate: str = "?"
    info: dict[str, Any] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    colo: dict[str, Any] = field(default_factory=dict)
    bandwidth: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    dirty: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    #: MB/s over the last second; (when, transferred) of the polls in it
    rate: float = 0.0
    _sent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    #: optional queries this host does not have
    missing: set[str] = field(default_factory=set)

    async def refresh(self) -> None:
        """Poll the host once; on any failure keep the last figures and say why."""
        try:
            if self.client is None:
                client = QMPClient("mig-top")
                await asyncio.wait_for(client.connect(target_address(self.socket)), 2.0)
                self.client = client
            self.runstate = (await self._ask("query-status"))["status"]
            info: dict[str, Any] = await self._ask("query-migrate")
            self.jobs = await self._optional("query-jobs") or []
            self.colo = await self._optional("query-colo-status") or {}
            self.error = None
        except Exception as e:  # noqa: BLE001 - a host that went away is shown, not fatal
            self.error = f"disconnected: {e}" if str(e) else f"disconnected: {type(e).__name__}"
            await self.drop()
            return
        ram = info.get("ram") or {}
        # a new migration (status back to setup, or counters that went back) starts new sparklines
        if info.get("status") == "setup" or ram.get("transferred", 0) < (self.info.get("ram") or {}).get(
                "transferred", 0):
            self.bandwidth.clear()
            self.dirty.clear()
            self.rate = 0.0
            self._sent.clear()
        now = time.monotonic()
        if info.get("status") in ("active", "postcopy-active", "device", "pre-switchover") and ram:
            # bandwidth: what was sent over the last second of polls (mbps is one rate-limit window's figure)
            self._sent.append((now, ram.get("transferred", 0)))
            while len(self._sent) > 2 and now - self._sent[1][0] >= RATE_WINDOW_S:
                self._sent.popleft()
            (t0, sent0), (t1, sent1) = self._sent[0], self._sent[-1]
            if t1 > t0:
                self.rate = max(0, sent1 - sent0) / (t1 - t0) / 1e6
                self.bandwidth.append(self.rate)
            self.dirty.append(ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096) / 1e6)
        self.info = info

    async def _ask(self, command: str) -> Any:
        assert self.client is not None
        return await asyncio.wait_for(self.client.execute(command), 2.0)

    async def _optional(self, command: str) -> Any:
        """A query this host may not have (COLO, jobs): None if it has not, and it is not asked again."""
        if command in self.missing:
            return None
        try:
            return await self._ask(command)
        except ExecuteError as e:
            if e.error.error.class_ == "CommandNotFound":
                self.missing.add(command)
            return None  # else it failed this time: asked again next time

    async def drop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            self.client = None

    def render(self) -> Panel:
        info, ram = self.info, self.info.get("ram") or {}
        status = info.get("status", "none")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        grid.add_row("status", Text(status, style=_STATUS_STYLE.get(status, "")))
        if ram:
            total, remaining = ram.get("total", 0), ram.get("remaining", 0)
            done = 1.0 if status == "completed" else (1 - remaining / total if total else 0.0)
            live = status not in ("completed", "failed", "cancelled")
            eta = f"{remaining / (self.rate * 1e6):.1f} s left" if self.rate > 0 and live else ""
            grid.add_row("progress", ProgressBar(total=100, completed=done * 100, width=50))
            grid.add_row("", Text(f"{done * 100:5.1f} %  pass {ram.get('dirty-sync-count', 0)}  "
                                  f"sent {ram.get('transferred', 0) / 1e6:,.1f} MB  "
                                  f"remaining {remaining / 1e6:,.1f} MB  {eta}"))
            grid.add_row("bandwidth", Text(f"{sparkline(self.bandwidth)} {self.rate if live else 0.0:,.1f} MB/s"))
            grid.add_row("dirty rate", Text(f"{sparkline(self.dirty)} {self.dirty[-1] if self.dirty else 0:,.1f} "
                                            f"MB/s"))
        throttle = [f"cpu {info['cpu-throttle-percentage']} %"] if "cpu-throttle-percentage" in info else []
        if "dirty-limit-throttle-time-per-round" in info:
            throttle.append(f"dirty-limit sleep {info['dirty-limit-throttle-time-per-round']} µs/round")
        if throttle:
            grid.add_row("throttle", "  ".join(throttle))
        down = [f"expected {info['expected-downtime']} ms"] if "expected-downtime" in info else []
        if "downtime" in info:
            down.append(f"was {info['downtime']} ms")
        if down:
            grid.add_row("downtime", "  ".join(down))
        if status.startswith("postcopy") or ram.get("postcopy-requests"):
            grid.add_row("postcopy", f"{ram.get('postcopy-requests', 0)} page requests, "
                                     f"{ram.get('postcopy-bytes', 0) / 1e6:,.1f} MB sent after the switch")
        if self.colo.get("mode", "none") != "none":
            grid.add_row("colo", f"{self.colo['mode']} (last {self.colo.get('last-mode')}, "
                                 f"{self.colo.get('reason')})")
        for job in self.jobs:
            total_p = job.get("total-progress") or 0
            pct = f"{job.get('current-progress', 0) * 100 / total_p:.0f} %" if total_p else ""
            grid.add_row("job", f"{job['id']} ({job['type']}): {job['status']} {pct}"
                         + (f" — {job['error']}" if job.get("error") else ""))
        if info.get("error-desc"):
            grid.add_row("error", Text(info["error-desc"], style="red"))
        if self.error:
            grid.add_row("monitor", Text(self.error, style="red"))
        return Panel(grid, title=f"{_abbreviated(str(self.socket))} — {self.runstate}", title_align="left")


#: Characters of a monitor address a panel title keeps: the run state after it must fit an 80-column terminal.
TITLE_ADDRESS = 50


def _abbreviated(address: str) -> str:
    """A long socket path keeps its end (the file names the host); the middle goes."""
    if len(address) <= TITLE_ADDRESS:
        return address
    return "…" + address[-(TITLE_ADDRESS - 1):]


def frame(views: list[HostView]) -> Group:
    return Group(*(v.render() for v in views), Text(f"mig top · {time.strftime('%H:%M:%S')} · Ctrl-C quits",
                                                    style="dim"))


async def run_top(sockets: tuple[str, ...], interval: float, once: bool, console: Console) -> None:
    views = [HostView(s) for s in sockets]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.gather(*(v.refresh() for v in views))
        if once:
            console.print(frame(views))
            return
        with Live(frame(views), console=console, refresh_per_second=8, screen=False) as live:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if stop.is_set():
                    break
                await asyncio.gather(*(v.refresh() for v in views))
                live.update(frame(views))
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await asyncio.gather(*(v.drop() for v in views))


@click.command("top")
@click.argument("sockets", nargs=-1, required=True)
@click.option("--interval", type=click.FloatRange(0.1, 60), default=0.5, show_default=True, metavar="S",
              help="Seconds between two polls.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top_cmd(sockets: tuple[str, ...], interval: float, once: bool) -> None:
    """Watch the migrations of one or more running hosts (QMP SOCKETs) live; Ctrl-C quits."""
    asyncio.run(run_top(sockets, interval, once, Console()))
