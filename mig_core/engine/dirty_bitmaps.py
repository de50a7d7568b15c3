"""The ``dirty-bitmaps`` capability: block nodes' named dirty bitmaps travel with the machine.

The source chooses the bitmaps at setup, as QEMU does: with ``block-bitmap-mapping`` only nodes and
bitmaps that have an alias (a ``transform`` may change ``persistent``), otherwise every named bitmap
under its node's name. They are busy while the migration runs and go as one section (QEMU's savevm id
``dirty-bitmap``) with the devices' final state, vCPUs stopped, so they hold every write. The
destination maps the aliases back; a node or bitmap it cannot place cancels the bitmaps' migration
(logged with QEMU's text, the machine migrates on), while a bitmap that already exists there fails the
load, as in QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from mig_core.block.bitmap import DirtyBitmap
from mig_core.block.node import BlockNode
from mig_core.errors import MigrationFailed, StreamError
from mig_core.machine.device import DeviceSection
from mig_core.machine.machine import Machine
from mig_core.qapi import UNSET
from mig_core.schema.migration import BitmapMigrationNodeAlias

log = structlog.get_logger("mig.dirty_bitmaps")

#: The section's device id (QEMU registers the bitmaps' handlers as "dirty-bitmap").
SECTION_ID = "dirty-bitmap"
_VERSION = 1
#: QEMU sends bitmap names as counted strings: at most 255 bytes without a mapping.
_NAME_MAX = 255


@dataclass
class OutgoingBitmap:
    """One bitmap the source sends, under the aliases the destination will see."""

    node: BlockNode
    bitmap: DirtyBitmap
    node_alias: str
    bitmap_alias: str
    persistent: bool


def _mapping(value: object) -> list[BitmapMigrationNodeAlias] | None:
    return None if value is UNSET or value is None else list(value)  # type: ignore[call-overload]


def plan(machine: Machine, mapping: object) -> list[OutgoingBitmap]:
    """The bitmaps to send (now busy); MigrationFailed if one cannot go (QEMU fails the setup then)."""
    aliases = _mapping(mapping)
    by_node = {m.node_name: m for m in aliases} if aliases is not None else None
    out: list[OutgoingBitmap] = []
    for node in machine.block_nodes.values():
        if not node.bitmaps:
            continue
        if by_node is not None:
            entry = by_node.get(node.name)
            if entry is None:
                continue  # no alias: not migrated
            node_alias, inner = entry.alias, {b.name: b for b in entry.bitmaps}
        else:
            node_alias, inner = node.name, None
        for bm in node.bitmaps.values():
            reason = bm.unusable()
            if reason is not None:
                raise MigrationFailed(reason)
            persistent = bm.persistent
            if inner is not None:
                alias = inner.get(bm.name)
                if alias is None:
                    continue
                bitmap_alias = alias.alias
                if alias.transform is not UNSET and alias.transform.persistent is not UNSET:
                    persistent = alias.transform.persistent
            else:
                if len(bm.name.encode()) > _NAME_MAX:
                    raise MigrationFailed(f"Cannot migrate bitmap '{bm.name}' on node '{node.name}': Name is longer "
                                          f"than {_NAME_MAX} bytes")
                bitmap_alias = bm.name
            out.append(OutgoingBitmap(node, bm, node_alias, bitmap_alias, persistent))
    for o in out:
        o.bitmap.busy = True
    log.info("dirty_bitmaps_planned", bitmaps=[f"{o.node.name}/{o.bitmap.name}" for o in out])
    return out


def release(bitmaps: list[OutgoingBitmap]) -> None:
    """The migration ended: the source's bitmaps are usable again."""
    for o in bitmaps:
        o.bitmap.busy = False


def section(bitmaps: list[OutgoingBitmap]) -> DeviceSection:
    """Every planned bitmap as it is now (vCPUs stopped): aliases, granularity, flags and bits."""
    entries = [{"node": o.node_alias, "bitmap": o.bitmap_alias, "granularity": o.bitmap.granularity,
                "size": o.bitmap.size, "enabled": o.bitmap.enabled, "persistent": o.persistent,
                "bits": o.bitmap.packed()} for o in bitmaps]
    return DeviceSection(SECTION_ID, 0, _VERSION, msgpack.packb(entries, use_bin_type=True))


class _Cancelled(Exception):
    """The destination gives up on the bitmaps (QEMU's cancel_incoming): logged, the load goes on."""


def load(sec: DeviceSection, machine: Machine, mapping: object) -> list[str]:
    """Create the section's bitmaps on this machine's nodes; the names created (``node/bitmap``).

    StreamError for a malformed section or a bitmap that already exists here; any other problem cancels
    the bitmaps (none is kept) and is logged, as QEMU reports it."""
    if sec.version != _VERSION:
        raise StreamError(f"dirty-bitmap section version {sec.version} is not {_VERSION}")
    try:
        entries: Any = msgpack.unpackb(sec.payload, raw=False)
        if not isinstance(entries, list):
            raise TypeError("not a list")
    except (ValueError, TypeError, msgpack.UnpackException) as bad:
        raise StreamError(f"corrupt dirty-bitmap section: {bad}") from None
    aliases = _mapping(mapping)
    by_alias = {m.alias: m for m in aliases} if aliases is not None else None
    created: list[tuple[BlockNode, DirtyBitmap]] = []
    try:
        for e in entries:
            node, name, persistent = _place(e, machine, by_alias)
            if name in node.bitmaps:
                raise StreamError(f"Bitmap with the same name ('{name}') already exists on destination")
            bm = DirtyBitmap(name, node.size, e["granularity"], enabled=bool(e["enabled"]),
                             persistent=persistent)
            if int(e["size"]) != node.size:
                raise _Cancelled(f"Migrated bitmap granularity doesn't match the destination bitmap '{name}' "
                                 "granularity")
            bm.load_packed(e["bits"])
            node.add_bitmap(bm)
            created.append((node, bm))
    except BaseException as err:
        for node, bm in created:  # none is kept, whatever stopped the load
            node.remove_bitmap(bm.name)
        if isinstance(err, _Cancelled):
            log.error("dirty_bitmaps_cancelled", error=str(err))
            return []
        if isinstance(err, (KeyError, TypeError, ValueError)) and not isinstance(err, StreamError):
            # a ValueError says what is wrong in words (a granularity, bits cut short); the others name a field
            detail = str(err) if type(err) is ValueError else repr(err)
            raise StreamError(f"corrupt dirty-bitmap section: {detail}") from None
        raise
    names = [f"{node.name}/{bm.name}" for node, bm in created]
    log.info("dirty_bitmaps_loaded", bitmaps=names)
    return names


def _place(e: dict[str, Any], machine: Machine,
           by_alias: dict[str, BitmapMigrationNodeAlias] | None) -> tuple[BlockNode, str, bool]:
    """The node, bitmap name and persistence an incoming entry maps to (QEMU's texts when it cannot)."""
    node_alias, bitmap_alias = str(e["node"]), str(e["bitmap"])
    persistent = bool(e["persistent"])
    if by_alias is not None:
        entry = by_alias.get(node_alias)
        if entry is None:
            raise _Cancelled(f"Error: Unknown node alias '{node_alias}'")
        node = machine.block_nodes.get(entry.node_name)
        if node is None:
            raise _Cancelled(f"Cannot find device='' nor node-name='{entry.node_name}'")
        inner = {b.alias: b for b in entry.bitmaps}.get(bitmap_alias)
        if inner is None:
            raise _Cancelled(f"Error: Unknown bitmap alias '{bitmap_alias}' on node '{node.name}' (alias "
                             f"'{node_alias}')")
        if inner.transform is not UNSET and inner.transform.persistent is not UNSET:
            persistent = inner.transform.persistent
        return node, inner.name, persistent
    node = machine.block_nodes.get(node_alias)
    if node is None:
        raise _Cancelled(f"Cannot find device='{node_alias}' nor node-name='{node_alias}'")
    return node, bitmap_alias, persistent
