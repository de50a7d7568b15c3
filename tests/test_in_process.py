"""Two machines migrating in one process over mig_core.testing's loopback transport (no sockets)."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from mig_core.control.manager import MigrationManager
from mig_core.machine.device import Device
from mig_core.machine.machine import Machine
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus
from mig_core.testing import migrate_in_process


class Ledger(msgspec.Struct):
    entries: list[int]


class LedgerDevice(Device):
    id = "ledger"
    state_type = Ledger

    def __init__(self, entries: list[int]) -> None:
        self.entries = entries

    def save_state(self) -> Any:
        return {"entries": self.entries}

    def load_state(self, state: Ledger, version: int) -> None:
        self.entries = state.entries


def machine(runstate: RunState, entries: list[int]) -> tuple[Machine, LedgerDevice]:
    m = Machine(runstate=runstate)
    m.add_ram("ram0", 4 << 20)
    m.add_ram("ram1", 2 << 20)
    dev = LedgerDevice(entries)
    m.add_device(dev)
    return m, dev


def test_two_blocks_and_a_device_migrate_exactly_in_one_process():
    src_m, src_dev = machine(RunState.RUNNING, [3, 1, 4, 1, 5])
    dst_m, dst_dev = machine(RunState.INMIGRATE, [])
    rng = np.random.default_rng(5)
    src_m.blocks[0].array[: 1 << 20] = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    src_m.blocks[1].array[-4096:] = 7
    src_m.mark_pages("ram0", np.arange(src_m.blocks[0].npages))
    src_m.mark_pages("ram1", np.arange(src_m.blocks[1].npages))
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    try:
        assert migrate_in_process(src, dst) is MigrationStatus.COMPLETED, src.error_desc
        assert dst.destination.state is MigrationStatus.COMPLETED, dst.error_desc
        for a, b in zip(src_m.blocks, dst_m.blocks, strict=True):
            assert np.array_equal(a.array, b.array), a.name
        assert dst_dev.entries == [3, 1, 4, 1, 5]
        assert src_m.run.state is RunState.POSTMIGRATE and dst_m.run.state is RunState.RUNNING
    finally:
        src_m.close()
        dst_m.close()
