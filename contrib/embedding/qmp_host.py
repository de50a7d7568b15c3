"""Embedding mig: a host program that owns its event loop and serves QMP next to its own work.

Run: python contrib/embedding/qmp_host.py /tmp/host.sock
Then drive it with any QMP client (qmp-shell /tmp/host.sock); `quit` ends it.
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from mig_core.hookspecs import hookimpl
from mig_core.logconfig import configure_logging
from mig_core.manager import MigrationManager
from mig_core.qmp.server import QMPServer

log = structlog.get_logger("example.host")


class PauseAware:
    """A hook plugin of the host's own: it hears every run-state change."""

    def __init__(self) -> None:
        self.running = True

    @hookimpl
    def mig_runstate_changed(self, old, new, running):  # type: ignore[no-untyped-def]
        self.running = running
        log.info("host_sees_runstate", state=new.value)


async def main(path: str) -> None:
    configure_logging("console")
    manager = MigrationManager()
    observer = PauseAware()
    manager.pm.register(observer)
    server = QMPServer(manager)
    await server.listen(f"unix:{path}")
    print(f"serving QMP on {path}", flush=True)

    ticks = 0

    async def work() -> None:
        nonlocal ticks
        while True:
            if observer.running:
                ticks += 1
            await asyncio.sleep(0.01)

    worker = asyncio.create_task(work())
    await server.serve_until_shutdown()
    worker.cancel()
    print(f"worked {ticks} ticks", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mig-host.sock"))
