"""QMP for block nodes: ``block-dirty-bitmap-add/-remove/-clear/-enable/-disable``, ``query-named-block-nodes``.

Arguments and error texts are QEMU's (block/monitor/bitmap-qmp-cmds.c): a node named by ``node`` is
looked up as QEMU's ``bdrv_lookup_bs`` does for ``-add``, and as ``block_dirty_bitmap_lookup`` does for
the others; a bitmap a migration holds is busy, an inconsistent one (left by a crash) can only be removed.
"""

from __future__ import annotations

import structlog

from mig_core.block.bitmap import DEFAULT_GRANULARITY, MAX_NAME, DirtyBitmap, granularity_error
from mig_core.block.node import BlockNode
from mig_core.errors import QMPError
from mig_core.machine.machine import Machine
from mig_core.qapi import UNSET
from mig_core.schema.block import (
    BlockdevCacheInfo,
    BlockDeviceInfo,
    BlockDirtyBitmapAddArgs,
    BlockDirtyBitmapArgs,
    BlockDirtyInfo,
    ImageInfo,
)

log = structlog.get_logger("mig.block")


def _usable(bm: DirtyBitmap, allow_inconsistent: bool = False) -> None:
    reason = bm.unusable(allow_inconsistent)
    if reason is not None:
        raise QMPError(reason)


class BlockNodeCommands:
    """The block-node commands of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def _lookup(self, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
        bs = self.machine.block_nodes.get(node)
        if bs is None:
            raise QMPError(f"Node '{node}' not found")
        bm = bs.bitmaps.get(name)
        if bm is None:
            raise QMPError(f"Dirty bitmap '{name}' not found")
        return bs, bm

    def add(self, args: BlockDirtyBitmapAddArgs) -> None:
        if not args.name:
            raise QMPError("Bitmap name cannot be empty")
        bs = self.machine.block_nodes.get(args.node)
        if bs is None:
            raise QMPError(f"Cannot find device='{args.node}' nor node-name='{args.node}'")
        granularity = DEFAULT_GRANULARITY if args.granularity is UNSET else args.granularity
        why = granularity_error(granularity)
        if why is not None:
            raise QMPError(why)
        if args.name in bs.bitmaps:
            raise QMPError(f"Bitmap already exists: {args.name}")
        if len(args.name.encode()) > MAX_NAME:
            raise QMPError(f"Bitmap name too long: {args.name}")
        bm = DirtyBitmap(args.name, bs.size, granularity, enabled=not args.disabled, persistent=bool(args.persistent))
        bs.add_bitmap(bm)
        log.info("dirty_bitmap_added", node=bs.name, bitmap=bm.name, granularity=granularity,
                 persistent=bm.persistent, enabled=bm.enabled)

    def remove(self, args: BlockDirtyBitmapArgs) -> None:
        bs, bm = self._lookup(args.node, args.name)
        _usable(bm, allow_inconsistent=True)
        bs.remove_bitmap(bm.name)
        log.info("dirty_bitmap_removed", node=bs.name, bitmap=bm.name)

    def clear(self, args: BlockDirtyBitmapArgs) -> None:
        _bs, bm = self._lookup(args.node, args.name)
        _usable(bm)
        bm.clear()

    def enable(self, args: BlockDirtyBitmapArgs) -> None:
        _bs, bm = self._lookup(args.node, args.name)
        _usable(bm)
        bm.enabled = True

    def disable(self, args: BlockDirtyBitmapArgs) -> None:
        _bs, bm = self._lookup(args.node, args.name)
        _usable(bm)
        bm.enabled = False

    def query(self) -> list[BlockDeviceInfo]:
        """Every node, as ``query-named-block-nodes`` lists it (bitmaps newest first, as QEMU's list)."""
        out = []
        for bs in self.machine.block_nodes.values():
            bitmaps = [BlockDirtyInfo(name=b.name, count=b.count, granularity=b.granularity, recording=b.enabled,
                                      busy=b.busy, persistent=b.persistent,
                                      inconsistent=True if b.inconsistent else UNSET)
                       for b in reversed(list(bs.bitmaps.values()))]
            out.append(BlockDeviceInfo(
                file=str(bs.path), node_name=bs.name, ro=False, drv="raw", encrypted=False, detect_zeroes="off",
                bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0,
                image=ImageInfo(filename=str(bs.path), format="raw", virtual_size=bs.size),
                cache=BlockdevCacheInfo(writeback=True, direct=False, no_flush=False), write_threshold=0,
                dirty_bitmaps=bitmaps))
        return out
