"""A block node's contents migrating with the machine, iteratively like RAM (what QEMU's removed block
migration did; today QEMU mirrors storage over NBD instead).

A node added with ``migrate=True`` (storage the destination does not share) gets this device. The
source sends every 4 KiB block in the first passes (consecutive ones as one run), then the blocks
written since (an anonymous bitmap on the node tracks them), and the last ones with the vCPUs stopped.
With ``zero-blocks`` a run of zero blocks goes as a marker. The destination writes what arrives straight
into its node's file (its own bitmaps do not see migration writes; the source's travel with
``dirty-bitmaps``); if both sides opened the very same file (shared storage after all), it writes nothing.
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

#: The unit the source tracks; consecutive dirty blocks go as one run (so a 4 KiB write costs 4 KiB, and
#: the first pass costs a record per chunk, not per block).
BLOCK = 4096
_DATA, _ZERO, _HEADER = b"D", b"Z", b"H"
_REC = struct.Struct("<cQI")  # kind, first block, block count
_NODE = struct.Struct("<QQQ")  # after _HEADER: the node's size, and its file's device and inode


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
        return _HEADER + _NODE.pack(self.node.size, st.st_dev, st.st_ino)

    def _records(self, max_bytes: int) -> bytes | None:
        """Runs of dirty blocks as records, about ``max_bytes`` at most; None when none is dirty."""
        d = self._dirty
        assert d is not None
        out = bytearray()
        if not self._header_sent:
            out += self._header()
            self._header_sent = True
        dirty = d.dirty_granules()
        runs = 0
        if len(dirty):
            # runs of consecutive blocks: where the index jumps, a new run starts
            starts = np.flatnonzero(np.diff(dirty, prepend=-2) != 1)
            ends = np.append(starts[1:], len(dirty))
            for a, b in zip(dirty[starts].tolist(), (dirty[ends - 1] + 1).tolist(), strict=True):
                while a < b:
                    room = (max_bytes - len(out)) // BLOCK
                    if room <= 0 and runs:
                        return bytes(out)
                    n = min(b - a, max(room, 1))
                    d.bits[a:a + n] = False  # before the read: a write meanwhile dirties its block again
                    out += self._run(a, n)
                    runs += 1
                    a += n
        return bytes(out) or None

    def _run(self, first: int, count: int) -> bytes:
        """Records for ``count`` blocks from ``first``: data, or with zero-blocks, zero runs as markers."""
        at = first * BLOCK
        data = self.node.read(at, min(count * BLOCK, self.node.size - at))
        if not self.zero_blocks:
            self.sent_data += count
            return _REC.pack(_DATA, first, count) + data
        padded = np.zeros(count * BLOCK, dtype=np.uint8)
        padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        nonzero = np.asarray(padded.reshape(count, BLOCK).any(axis=1), dtype=bool)
        out = bytearray()
        cuts = np.flatnonzero(np.diff(nonzero.astype(np.int8), prepend=-1, append=-1) != 0)
        for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            if nonzero[lo]:
                out += _REC.pack(_DATA, first + lo, hi - lo) + data[lo * BLOCK:hi * BLOCK]
                self.sent_data += hi - lo
            else:
                out += _REC.pack(_ZERO, first + lo, hi - lo)
                self.sent_zero += hi - lo
        return bytes(out)

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
                self._need(view, pos, 1 + _NODE.size, "header")
                size, dev, ino = _NODE.unpack_from(view, pos + 1)
                pos += 1 + _NODE.size
                if size != self.node.size:
                    raise DeviceStateError(f"device '{self.id}': the source's node has {size} bytes, this one "
                                           f"{self.node.size}")
                st = os.stat(self.node.path)
                self._same_file = (st.st_dev, st.st_ino) == (dev, ino)
                continue
            self._need(view, pos, _REC.size, "record")
            _k, first, count = _REC.unpack_from(view, pos)
            pos += _REC.size
            at = first * BLOCK
            length = min(count * BLOCK, self.node.size - at)
            if count == 0 or length <= 0:
                raise DeviceStateError(f"device '{self.id}': blocks {first}+{count} are beyond the node's "
                                       f"{self.node.size} bytes")
            if kind == _ZERO:
                data: bytes | memoryview = bytes(length)
            elif kind == _DATA:
                data = view[pos:pos + length]
                if data.nbytes != length:
                    raise DeviceStateError(f"device '{self.id}': a run of {count} blocks ends early")
                pos += length
            else:
                raise DeviceStateError(f"device '{self.id}': unknown record {kind!r}")
            if not self._same_file:
                self.node.write_untracked(at, data)

    def _need(self, view: memoryview, pos: int, size: int, what: str) -> None:
        """DeviceStateError unless ``size`` bytes of a ``what`` are left at ``pos``."""
        if len(view) - pos < size:
            raise DeviceStateError(f"device '{self.id}': a {what} of {size} bytes is cut short at byte {pos} of "
                                   f"{len(view)}")
