"""Embedding mig: a simulation whose state is numpy arrays plus a device, serving QMP beside its work.

Run two of them and migrate between them with any QMP client:

    python contrib/embedding/qmp_host.py /tmp/a.sock                 # source
    python contrib/embedding/qmp_host.py /tmp/b.sock --incoming      # destination (waits)
    mig qmp unix:/tmp/b.sock migrate-incoming uri=unix:/tmp/m.sock
    mig migrate unix:/tmp/a.sock unix:/tmp/m.sock

The grid lives in a RAM block (so it migrates page by page while the simulation
keeps stepping on a vCPU thread); the step counter is a device (so it migrates
with the machine stopped, consistent with the grid).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import numpy as np
import structlog

from mig_core import Device, Machine, MigrationManager, QMPServer, Vcpu, configure_logging, hookimpl
from mig_core.schema.common import RunState

log = structlog.get_logger("example.host")
N = 512  # grid side: 512 x 512 float64 = 2 MiB


class StepCounter(Device):
    """The simulation's bookkeeping: how many steps ran; migrates with the machine stopped."""

    id = "example-steps"
    version = 1
    state_type = dict[str, int]  # validated before load_state sees it

    def __init__(self) -> None:
        self.steps = 0

    def save_state(self) -> Any:
        return {"steps": self.steps}

    def load_state(self, state: Any, version: int) -> None:
        self.steps = state["steps"]


class Announcer:
    """A hook plugin of the host's own: it hears run-state changes and announces."""

    @hookimpl
    def mig_runstate_changed(self, old, new, running):  # type: ignore[no-untyped-def]
        log.info("host_sees_runstate", state=new.value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--incoming", action="store_true", help="wait for an incoming migration")
    args = ap.parse_args()
    configure_logging("console")

    machine = Machine(runstate=RunState.INMIGRATE if args.incoming else RunState.RUNNING)
    block = machine.add_ram("grid", N * N * 8)
    grid = block.array.view(np.float64).reshape(N, N)  # the simulation's state, in migratable RAM
    counter = StepCounter()
    machine.add_device(counter)
    if not args.incoming:
        grid[:] = np.random.default_rng(0).random((N, N))
        machine.start_tracking()

    def simulate(vcpu: Vcpu) -> None:
        while True:
            vcpu.safe_point()  # mig stops, throttles and resumes the simulation here
            rows = slice(counter.steps % N, counter.steps % N + 8)
            grid[rows] = 0.5 * (grid[rows] + np.roll(grid[rows], 1, axis=1))
            counter.steps += 1

    machine.vcpus.run(simulate, 1)
    manager = MigrationManager(machine)
    manager.hooks.register(Announcer())

    async def serve() -> None:
        server = QMPServer(manager)
        await server.listen(f"unix:{args.socket}")
        print(f"serving QMP on {args.socket}", flush=True)
        await server.serve_until_shutdown()
        print(f"steps {counter.steps} grid-sum {float(grid.sum()):.6f}", flush=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
