"""Bitmaps read from where they can be damaged (a migration's dirty-bitmap section, a node's sidecar file)
are taken whole or not at all: a granule missing from the bits would read as clean, and a backup built on
the bitmap would leave that granule's writes out."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from mig_core.block.bitmap import DirtyBitmap
from mig_core.block.node import BlockNode
from mig_core.engine import dirty_bitmaps
from mig_core.errors import StreamError
from mig_core.machine.device import DeviceSection
from mig_core.machine.machine import Machine

SIZE = 4 << 20  # 1024 granules of 4 KiB: 128 bytes of bits


@pytest.fixture
def machines(tmp_path: Path):
    """A source whose node has a written bitmap ``b0`` (granularity 4 KiB), and a destination with the node."""
    made = []
    for side in ("src", "dst"):
        m = Machine()
        m.add_block_node(BlockNode("disk0", tmp_path / f"{side}.img", SIZE))
        made.append(m)
    src = made[0].block_nodes["disk0"]
    src.add_bitmap(DirtyBitmap("b0", SIZE, 4096))
    src.write(12345, b"x" * 10000)
    src.write(SIZE - 1, b"y")  # the very last granule: the one a short list of bits loses first
    yield made
    for m in made:
        for node in m.block_nodes.values():
            node.close()


def _section(src: Machine, change: dict | None = None) -> DeviceSection:
    sec = dirty_bitmaps.section(dirty_bitmaps.plan(src, None))
    entries = msgpack.unpackb(sec.payload, raw=False)
    entries[0].update(change or {})
    return DeviceSection(sec.id, sec.instance, sec.version, msgpack.packb(entries, use_bin_type=True))


def test_a_whole_section_loads_every_dirty_granule(machines) -> None:
    src, dst = machines
    assert dirty_bitmaps.load(_section(src), dst, None) == ["disk0/b0"]
    got = dst.block_nodes["disk0"].bitmaps["b0"]
    assert np.array_equal(got.dirty_granules(), src.block_nodes["disk0"].bitmaps["b0"].dirty_granules())
    assert got.dirty_granules()[-1] == SIZE // 4096 - 1


@pytest.mark.parametrize(("change", "error"), [
    (lambda bits: {"bits": bits[:-1]}, "bitmap 'b0' carries 127 bytes of bits, 128 expected"),
    (lambda bits: {"bits": b""}, "bitmap 'b0' carries 0 bytes of bits, 128 expected"),
    (lambda bits: {"bits": bits + b"\0"}, "bitmap 'b0' carries 129 bytes of bits, 128 expected"),
    (lambda bits: {"granularity": 0}, "bitmap 'b0': Granularity must be power of 2 and at least 512 (got 0)"),
    (lambda bits: {"granularity": 256}, "Granularity must be power of 2 and at least 512 (got 256)"),
    (lambda bits: {"granularity": 3 << 10}, "Granularity must be power of 2 and at least 512 (got 3072)"),
    (lambda bits: {"granularity": 1 << 32}, "Granularity must be power of 2 and at least 512 (got 4294967296)"),
    (lambda bits: {"granularity": "4096"}, "Granularity must be power of 2 and at least 512 (got '4096')"),
])
def test_a_damaged_section_is_refused_and_leaves_no_bitmap(machines, change, error: str) -> None:
    src, dst = machines
    bits = src.block_nodes["disk0"].bitmaps["b0"].packed()
    with pytest.raises(StreamError, match="^corrupt dirty-bitmap section: ") as e:
        dirty_bitmaps.load(_section(src, change(bits)), dst, None)
    assert error in str(e.value)
    assert dst.block_nodes["disk0"].bitmaps == {}


def _stored(tmp_path: Path) -> tuple[Path, dict]:
    """A node closed with two persistent bitmaps; its sidecar's path and document."""
    node = BlockNode("disk0", tmp_path / "disk.img", SIZE)
    for name in ("keep", "other"):
        node.add_bitmap(DirtyBitmap(name, SIZE, 4096, persistent=True))
    node.write(SIZE - 4096, b"z" * 4096)
    node.close()
    return node.sidecar, msgpack.unpackb(node.sidecar.read_bytes(), raw=False)


def test_a_sidecar_loads_its_bitmaps_as_stored(tmp_path: Path) -> None:
    sidecar, _ = _stored(tmp_path)
    node = BlockNode("disk0", tmp_path / "disk.img")
    try:
        assert sorted(node.bitmaps) == ["keep", "other"]
        assert node.bitmaps["keep"].dirty_granules().tolist() == [SIZE // 4096 - 1]
        assert not node.bitmaps["keep"].inconsistent
    finally:
        node.close()


@pytest.mark.parametrize("damage", ["bits cut short", "granularity 0", "not a map"])
def test_a_damaged_sidecar_loads_no_bitmap_and_is_kept_aside(tmp_path: Path, damage: str) -> None:
    sidecar, doc = _stored(tmp_path)
    if damage == "bits cut short":
        doc["bitmaps"]["other"]["bits"] = doc["bitmaps"]["other"]["bits"][:100]
    elif damage == "granularity 0":
        doc["bitmaps"]["other"]["granularity"] = 0
    else:
        doc["bitmaps"] = [doc["bitmaps"]]
    damaged = msgpack.packb(doc, use_bin_type=True)
    sidecar.write_bytes(damaged)
    node = BlockNode("disk0", tmp_path / "disk.img")
    try:
        # all or nothing: "keep" is whole, but it came from the same file as the damaged one
        assert node.bitmaps == {}
    finally:
        node.close()
    # with no persistent bitmap left nothing was stored; the damaged file is still there to be looked at
    assert not sidecar.exists()
    assert sidecar.with_name(sidecar.name + ".unreadable").read_bytes() == damaged
