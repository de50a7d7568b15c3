"""Block node benchmark (``make bench WHICH=block``): what a 1 GiB node with 1 % of its blocks dirtied
after the bulk copy costs on the wire, against the dirty set itself (the limit: nothing less carries it).

Two machines migrate in this process over a real TCP socket with ``dirty-bitmaps`` and ``switchover-ack``:
the destination withholds its ack until the benchmark has written 1 % of the node's 4 KiB blocks (at
random) after the source's first (bulk) pass, so those blocks go in the passes that follow. The bytes
those passes carried for the node (``PassRecord.device_bytes``) plus the final state and the bitmap
section are set against the dirty set (blocks written × 4 KiB).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mig_core.block.node import BlockNode
from mig_core.control.manager import MigrationManager
from mig_core.engine import dirty_bitmaps
from mig_core.engine.dirty_bitmaps import OutgoingBitmap
from mig_core.machine.block_data import BLOCK
from mig_core.machine.device import Device
from mig_core.machine.machine import Machine
from mig_core.qapi.visitor import from_qmp
from mig_core.schema.block import BlockDirtyBitmapAddArgs
from mig_core.schema.commands import MigrateArgs, MigrateIncomingArgs, MigrateSetCapabilitiesArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus as S

GIB = 1 << 30
CAPS = ("return-path", "switchover-ack", "dirty-bitmaps")


class Gate(Device):
    """Holds the switchover until ``open`` is set (its destination twin withholds the ack)."""

    id = "bench-gate"

    def __init__(self) -> None:
        self.open = threading.Event()

    def switchover_ack_needed(self, approve: Any) -> bool:
        threading.Thread(target=lambda: (self.open.wait(600), approve()), daemon=True).start()
        return True


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(GIB >> 26):
            f.write(os.urandom(64 << 20))


def dirty_one_percent(tmp: Path) -> dict[str, float]:
    src_img, dst_img = tmp / "src.img", tmp / "dst.img"
    _fill(src_img)
    with open(dst_img, "wb") as f:
        f.truncate(GIB)
    src_m, dst_m = Machine(runstate=RunState.RUNNING), Machine(runstate=RunState.INMIGRATE)
    for m in (src_m, dst_m):
        m.add_ram("ram0", 16 << 20)
    src_node, dst_node = BlockNode("disk0", src_img), BlockNode("disk0", dst_img)
    src_m.add_block_node(src_node, migrate=True)
    dst_m.add_block_node(dst_node, migrate=True)
    src_gate, dst_gate = Gate(), Gate()
    src_m.add_device(src_gate)
    dst_m.add_device(dst_gate)
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    caps = from_qmp(MigrateSetCapabilitiesArgs, {"capabilities": [{"capability": c, "state": True} for c in CAPS]})
    try:
        for mgr in (src, dst):
            mgr.migrate_set_capabilities(caps)
        src.block_dirty_bitmap_add(BlockDirtyBitmapAddArgs(node="disk0", name="backup"))
        dst.migrate_incoming(MigrateIncomingArgs(uri="tcp:127.0.0.1:0"))
        (addr,) = dst.query_migrate().socket_address
        t0 = time.monotonic()
        src.migrate(MigrateArgs(uri=f"tcp:127.0.0.1:{addr.value.port}"))
        out = src.outgoing
        assert out is not None
        # the bulk pass is over once a pass carried (almost) nothing of the node
        while not any(p.switchover_ack_wait_ms > 0 for p in out.stats().passes):
            assert src.source.state in (S.SETUP, S.ACTIVE), src.error_desc
            time.sleep(0.05)
        bulk_passes = len(out.stats().passes)
        bulk_s = time.monotonic() - t0
        rng = np.random.default_rng(7)
        blocks = rng.choice(GIB // BLOCK, size=GIB // BLOCK // 100, replace=False)
        for b in blocks.tolist():
            src_node.write(b * BLOCK, os.urandom(BLOCK))
        dirty_set = len(blocks) * BLOCK
        # let the passes that carry them run, then release the switchover
        while src_m.devices.get("block:disk0", 0).state_pending().total:  # type: ignore[union-attr]
            time.sleep(0.05)
        dst_gate.open.set()
        assert src.source.wait_for({S.COMPLETED, S.FAILED}, 600) and src.source.state is S.COMPLETED, src.error_desc
        assert dst.destination.wait_for({S.COMPLETED, S.FAILED}, 60)
        passes = out.stats().passes
        after = sum(p.device_bytes for p in passes[bulk_passes:])
        backup = src_node.bitmaps["backup"]
        bitmap_bytes = len(dirty_bitmaps.section([OutgoingBitmap(src_node, backup, "disk0", "backup", False)]).payload)
        with open(src_img, "rb") as a, open(dst_img, "rb") as b:
            exact = all(a.read(64 << 20) == b.read(64 << 20) for _ in range(GIB >> 26))
        return {"dirty_mib": dirty_set / (1 << 20), "sent_mib": (after + bitmap_bytes) / (1 << 20),
                "ratio": (after + bitmap_bytes) / dirty_set, "bitmap_kib": bitmap_bytes / 1024,
                "bulk_s": bulk_s, "exact": exact}
    finally:
        src_gate.open.set()
        dst_gate.open.set()
        src_m.close()
        dst_m.close()


def main() -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MIG_BENCH_DIR")) as d:
        r = dirty_one_percent(Path(d))
    print("### Block node: 1 GiB, 1 % of its 4 KiB blocks dirtied after the bulk copy\n")
    print("| dirty set (MiB) | sent for it, data + bitmap (MiB) | × dirty set | bitmap (KiB) | bulk copy (s) | "
          "exact |\n|---|---|---|---|---|---|")
    print(f"| {r['dirty_mib']:.2f} | {r['sent_mib']:.2f} | {r['ratio']:.3f} | {r['bitmap_kib']:.1f} | "
          f"{r['bulk_s']:.1f} | {r['exact']} |\n")
