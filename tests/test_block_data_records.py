"""The records a block node's contents travel in, read by the destination's device: a stream cut inside
a record is refused with a DeviceStateError that says where, and what arrived whole is written exact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mig_core.block.node import BlockNode
from mig_core.errors import DeviceStateError
from mig_core.machine.block_data import BlockDataDevice

SIZE = 64 << 10


@pytest.fixture
def pair(tmp_path: Path):
    """A source device over a node with data and zero blocks (zero-blocks on), its records, and a
    destination device over a node of stale bytes."""
    src, dst = BlockNode("disk0", tmp_path / "src.img", SIZE), BlockNode("disk0", tmp_path / "dst.img", SIZE)
    src.write(4096, os.urandom(3 * 4096))
    src.write(SIZE - 100, b"end")
    dst.write(0, b"\xff" * SIZE)
    tx, rx = BlockDataDevice(src), BlockDataDevice(dst)
    tx.zero_blocks = True
    tx.save_setup()
    records = tx.save_state()
    tx.save_cleanup()
    rx.load_setup()
    yield src, dst, rx, records
    src.close()
    dst.close()


def test_whole_records_write_the_node_exact(pair) -> None:
    src, dst, rx, records = pair
    rx.load_iterate(records)
    assert dst.read(0, SIZE) == src.read(0, SIZE)


@pytest.mark.parametrize(("cut", "error"), [
    (5, "a header of 25 bytes is cut short at byte 0 of 5"),
    (25 + 7, "a record of 13 bytes is cut short at byte 25 of 32"),
])
def test_records_cut_short_are_refused_with_where(pair, cut: int, error: str) -> None:
    *_, rx, records = pair
    with pytest.raises(DeviceStateError, match=f"^device 'block:disk0': {error}$"):
        rx.load_iterate(records[:cut])
