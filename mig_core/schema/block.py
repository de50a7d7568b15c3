"""Block dirty bitmaps and the node listing, as QEMU's block-core schema has them (the members mig fills)."""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, Int, QapiStruct, Str, UInt32, UnsetType


class BlockDirtyBitmapAddArgs(QapiStruct):
    """``block-dirty-bitmap-add``: ``granularity`` a power of 2 of at least 512 (default 64 KiB)."""

    node: Str
    name: Str
    granularity: UInt32 | UnsetType = UNSET
    persistent: Bool | UnsetType = UNSET
    disabled: Bool | UnsetType = UNSET


class BlockDirtyBitmapArgs(QapiStruct):
    """A bitmap named on a node (``-remove``, ``-clear``, ``-enable``, ``-disable``)."""

    node: Str
    name: Str


class QueryNamedBlockNodesArgs(QapiStruct):
    flat: Bool | UnsetType = UNSET


class BlockDirtyInfo(QapiStruct):
    """``count``: dirty bytes (dirty granules × granularity); ``recording``: enabled."""

    count: Int
    granularity: UInt32
    recording: Bool
    busy: Bool
    persistent: Bool
    name: Str | UnsetType = UNSET
    inconsistent: Bool | UnsetType = UNSET


class ImageInfo(QapiStruct):
    filename: Str
    format: Str
    virtual_size: Int


class BlockdevCacheInfo(QapiStruct):
    writeback: Bool
    direct: Bool
    no_flush: Bool


class BlockDeviceInfo(QapiStruct):
    """One node of ``query-named-block-nodes``: a raw file, no throttling, with its dirty bitmaps."""

    file: Str
    ro: Bool
    drv: Str
    encrypted: Bool
    detect_zeroes: Str
    bps: Int
    bps_rd: Int
    bps_wr: Int
    iops: Int
    iops_rd: Int
    iops_wr: Int
    image: ImageInfo
    cache: BlockdevCacheInfo
    write_threshold: Int
    node_name: Str | UnsetType = UNSET
    dirty_bitmaps: list[BlockDirtyInfo] | UnsetType = UNSET
