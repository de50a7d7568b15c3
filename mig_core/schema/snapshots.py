"""mig's ``x-query-snapshots`` extension: the snapshots every storage node holds."""

from __future__ import annotations

from mig_core.qapi import Int, QapiStruct, Str


class XSnapshotInfo(QapiStruct):
    """One snapshot on one node; ``name``, ``vm-state-size``, ``date-sec`` and ``date-nsec`` as QEMU's
    SnapshotInfo (query-block's image info) has them."""

    node: Str
    backend: Str
    name: Str
    vm_state_size: Int
    date_sec: Int
    date_nsec: Int
    #: bytes on storage that only this snapshot uses (pages shared with other tags are not counted)
    size: Int
    #: bytes of RAM the snapshot restores (the machine's RAM size when it was saved)
    ram_size: Int
