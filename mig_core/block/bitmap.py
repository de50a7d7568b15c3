"""A named dirty bitmap on a block node: one bit per ``granularity`` bytes, set by writes while enabled."""

from __future__ import annotations

import threading

import numpy as np

#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_NAME = 1023
#: Granularity of a bitmap added without one (QEMU's default for a raw file).
DEFAULT_GRANULARITY = 64 << 10
#: QEMU's bounds: at least a sector, at most what its 32-bit argument holds (a power of 2 in between).
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31


def granularity_error(granularity: int) -> str | None:
    """Why ``granularity`` cannot be a bitmap's (QEMU's text); None if it can."""
    if (isinstance(granularity, bool) or not isinstance(granularity, int)
            or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY or granularity & (granularity - 1)):
        return "Granularity must be power of 2 and at least 512"
    return None


class DirtyBitmap:
    """Which granules of a node were written since the bitmap was added or cleared (QEMU's BdrvDirtyBitmap).

    ``enabled`` bitmaps record writes; ``persistent`` ones are stored beside the node's file and come
    back when it is opened again (``inconsistent`` if the node was not closed cleanly); ``busy`` while
    a migration holds it.
    """

    def __init__(self, name: str, size: int, granularity: int = DEFAULT_GRANULARITY, *, enabled: bool = True,
                 persistent: bool = False) -> None:
        why = granularity_error(granularity)
        if why is not None:  # read from a stream or a sidecar as well as from a command: checked here, once
            raise ValueError(f"bitmap '{name}': {why} (got {granularity!r})")
        self.name = name
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self.persistent = persistent
        self.busy = False
        self.inconsistent = False
        self.bits = np.zeros(-(-size // granularity), dtype=bool)
        self._lock = threading.Lock()

    def mark(self, offset: int, length: int) -> None:
        """A write of ``length`` bytes at ``offset`` (recorded only while enabled)."""
        if self.enabled and length > 0:
            with self._lock:
                self.bits[offset // self.granularity:(offset + length - 1) // self.granularity + 1] = True

    def unusable(self, allow_inconsistent: bool = False) -> str | None:
        """Why a command or a migration may not use this bitmap now (QEMU's bdrv_dirty_bitmap_check); None
        if it may. Removal allows an inconsistent one."""
        if self.busy:
            return f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
        if self.inconsistent and not allow_inconsistent:
            return f"Bitmap '{self.name}' is inconsistent and cannot be used"
        return None

    @property
    def count(self) -> int:
        """Dirty bytes as QEMU counts them: dirty granules × granularity."""
        return int(np.count_nonzero(self.bits)) * self.granularity

    def clear(self) -> None:
        with self._lock:
            self.bits[:] = False

    def dirty_granules(self) -> np.ndarray:
        """Indices of the dirty granules."""
        with self._lock:
            return np.flatnonzero(self.bits)

    def packed(self) -> bytes:
        """The bits, eight per byte (``numpy.packbits``), as they are stored and sent."""
        with self._lock:
            return np.packbits(self.bits).tobytes()

    def load_packed(self, data: bytes) -> None:
        """Replace the bits with ``packed()`` output of a bitmap of the same size and granularity.

        ValueError unless ``data`` holds exactly that many bytes: unpacking fewer would take the missing
        granules as clean, and a backup built on the bitmap would leave their writes out."""
        expected = (len(self.bits) + 7) // 8
        if len(data) != expected:
            raise ValueError(f"bitmap '{self.name}' carries {len(data)} bytes of bits, {expected} expected")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=len(self.bits)).astype(bool)
        with self._lock:
            self.bits[:] = bits
