"""``mig demo``: start a ``mig run`` host, drive it over QMP with qemu.qmp, print what happened.

Until live migration lands this shows the control plane end to end: greeting,
negotiation, capabilities, parameters (a refused one too), run-state events.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from qemu.qmp import ExecuteError, QMPClient


@click.command()
def demo() -> None:
    """Drive a freshly started mig host over QMP and print each exchange."""
    with tempfile.TemporaryDirectory(prefix="mig-demo-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        env = dict(os.environ, MIG_LOG_LEVEL="warning")
        proc = subprocess.Popen([sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{sock}"], env=env)
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException("mig run did not start")
                time.sleep(0.05)
            asyncio.run(_talk(str(sock), deadline))
            code = proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    if code != 0:
        raise click.ClickException(f"mig run exited with status {code}")
    click.echo("demo: host exited cleanly after quit")


async def _talk(path: str, deadline: float) -> None:
    qmp = QMPClient("mig-demo")
    while True:
        try:
            await qmp.connect(path)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    version = qmp.greeting.QMP.version
    q = version["qemu"]
    click.echo(f"greeting: {version['package']} speaking QEMU {q['major']}.{q['minor']}.{q['micro']} QMP")
    events: list[str] = []

    async def collect() -> None:
        async for ev in qmp.events:
            events.append(ev["event"])

    task = asyncio.create_task(collect())
    status = await qmp.execute("query-status")
    click.echo(f"query-status -> {status}")
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True},
                                        {"capability": "return-path", "state": True}]})
    await qmp.execute("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 1 << 30})
    params = await qmp.execute("query-migrate-parameters")
    click.echo(f"downtime-limit={params['downtime-limit']} max-bandwidth={params['max-bandwidth']}")  # type: ignore[index]
    try:
        await qmp.execute("migrate-set-parameters", {"multifd-channels": 0})
    except ExecuteError as e:
        click.echo(f"refused as QEMU would: {e.error.error.desc}")
    await qmp.execute("stop")
    await qmp.execute("cont")
    click.echo(f"query-migrate -> {await qmp.execute('query-migrate')}")
    await qmp.execute("quit")
    await asyncio.sleep(0.1)
    task.cancel()
    click.echo(f"events seen: {', '.join(events)}")
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the host closed the connection after quit, as QEMU does
