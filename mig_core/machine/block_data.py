"""A block node's contents migrating with the machine, iteratively like RAM (what QEMU's removed block
migration did; today QEMU mirrors storage over NBD instead).

A node added with ``migrate=True`` (storage the destination does not share) gets this device. The
source sends every 64 KiB block in the first passes, then the blocks written since (an anonymous
bitmap on the node tracks them), and the last ones with the vCPUs stopped. With ``zero-blocks`` a block
of zeroes goes as a marker. The destination writes what arrives straight into its node's file (its own
bitmaps do not see migration writes; the source's travel with ``dirty-bitmaps``); if both sides opened
the very same file (shared storage after all), it writes nothing.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from mig_core.block.bitmap import DirtyBitmap
from mig_core.block.node import BlockNode
from mig_core.errors import DeviceStateError
from mig_core.machine.device import Device, PendingState

#: The unit the source tracks and sends (QEMU's block migration used 1 MiB; finer sends less per write).
BLOCK = 64 << 10
_DATA, _ZERO, _HEADER = b"D", b"Z", b"H"
_REC = struct.Struct("<cQ")  # kind, block index


class BlockDataDevice(Device):
    """Migrates one node's contents; its id names the node (``block:NODE``) on both sides."""

    state_type = None

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        self.id = f"block:{node.name}"
        #: set by the engine from the zero-blocks capability before a migration starts
        self.zero_blocks = False
        self._dirty: DirtyBitmap | None = None
        self._header_sent = False
        self._same_file = False
        self.sent_data = self.sent_zero = 0

    # -- source -----------------------------------------------------------------------------

    def save_setup(self) -> None:
        self._dirty = DirtyBitmap("", self.node.size, BLOCK)
        self._dirty.bits[:] = True  # the first pass sends everything
        self.node.add_tracker(self._dirty)
        self._header_sent = False
        self.sent_data = self.sent_zero = 0

    def state_pending(self) -> PendingState:
        d = self._dirty
        return PendingState(must_precopy=0 if d is None else int(np.count_nonzero(d.bits)) * BLOCK)

    def _header(self) -> bytes:
        st = os.stat(self.node.path)
        return _HEADER + struct.pack("<QQQ", self.node.size, st.st_dev, st.st_ino)

    def _records(self, max_bytes: int) -> bytes | None:
        """Dirty blocks as records, at most about ``max_bytes``; None when none is dirty."""
        d = self._dirty
        assert d is not None
        out = bytearray()
        if not self._header_sent:
            out += self._header()
            self._header_sent = True
        for i in d.dirty_granules():
            if out and len(out) + _REC.size + BLOCK > max_bytes:
                break
            d.bits[i] = False  # before the read: a write meanwhile dirties it again
            data = self.node.read(int(i) * BLOCK, BLOCK)
            if self.zero_blocks and not np.frombuffer(data, dtype=np.uint8).any():
                out += _REC.pack(_ZERO, int(i))
                self.sent_zero += 1
            else:
                out += _REC.pack(_DATA, int(i)) + struct.pack("<I", len(data)) + data
                self.sent_data += 1
        return bytes(out) or None

    def save_iterate(self, max_bytes: int) -> bytes | None:
        return self._records(max_bytes)

    def save_state(self) -> Any:
        return self._records(1 << 62) or b""

    def save_cleanup(self) -> None:
        if self._dirty is not None:
            self.node.remove_tracker(self._dirty)
            self._dirty = None

    # -- destination -------------------------------------------------------------------------

    def load_setup(self) -> None:
        self._same_file = False

    def load_iterate(self, chunk: bytes) -> None:
        self._apply(chunk)

    def load_state(self, state: Any, version: int) -> None:
        if not isinstance(state, bytes):
            raise DeviceStateError(f"device '{self.id}': expected bytes, got {type(state).__name__}")
        self._apply(state)

    def _apply(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        pos = 0
        while pos < len(view):
            kind = bytes(view[pos:pos + 1])
            if kind == _HEADER:
                size, dev, ino = struct.unpack_from("<QQQ", view, pos + 1)
                pos += 25
                if size != self.node.size:
                    raise DeviceStateError(f"device '{self.id}': the source's node has {size} bytes, this one "
                                           f"{self.node.size}")
                st = os.stat(self.node.path)
                self._same_file = (st.st_dev, st.st_ino) == (dev, ino)
                continue
            _k, index = _REC.unpack_from(view, pos)
            pos += _REC.size
            at = index * BLOCK
            if at >= self.node.size:
                raise DeviceStateError(f"device '{self.id}': block {index} is beyond the node's {self.node.size} "
                                       "bytes")
            if kind == _ZERO:
                data: bytes | memoryview = bytes(min(BLOCK, self.node.size - at))
            elif kind == _DATA:
                (n,) = struct.unpack_from("<I", view, pos)
                pos += 4
                data = view[pos:pos + n]
                pos += n
            else:
                raise DeviceStateError(f"device '{self.id}': unknown record {kind!r}")
            if not self._same_file:
                self.node.write_untracked(at, data)
