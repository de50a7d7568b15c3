"""The memory a background snapshot's fault server shares with the migration thread (one memfd).

When a vCPU writes a page the snapshot has not sent yet, the fault server copies the page's old
contents into the next slot of an append-only log, records which page it was, publishes the slot by
advancing ``head``, and only then lets the write through. The migration thread reads the log up to
``head`` (sending those pages first) and marks every page it sent in ``done``, which the fault server
checks so a page already sent is let through at once. Each page is saved at most once (its write
protection is gone afterwards), so a log of one slot per page never fills: a fault never waits for the
migration thread, which may itself be waiting for the GIL a faulting vCPU holds. Slots are only
memory once written, and the migration thread hands drained ones back to the kernel.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

_HEADER = 64
#: ``done`` value of a page written before the instant, while protection was being put in place (the
#: fault server let the write through); the migration thread protects such pages again at the instant
ARMED = 2
_ALIGN = 4096


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Where each part lives in the shared memfd (the same in both processes)."""

    npages: tuple[int, ...]
    slot_size: int

    @property
    def nslots(self) -> int:
        return sum(self.npages)

    @property
    def index_offset(self) -> int:
        return _HEADER

    @property
    def done_offset(self) -> int:
        return _up(self.index_offset + 16 * self.nslots)

    @property
    def data_offset(self) -> int:
        return _up(self.done_offset + self.nslots)

    @property
    def size(self) -> int:
        return self.data_offset + self.nslots * self.slot_size


class RescueLog:
    """A view of the shared memfd: ``head``/``tail`` counters, the slot index, ``done`` flags, slot data."""

    def __init__(self, layout: Layout, fd: int) -> None:
        self.layout = layout
        self.fd = fd
        self.map = mmap.mmap(fd, layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buf = memoryview(self.map)
        self.counters = np.frombuffer(buf[:16], dtype=np.uint64)  # head, tail
        n = layout.nslots
        index = np.frombuffer(buf[layout.index_offset:layout.index_offset + 16 * n], dtype=np.int64).reshape(n, 2)
        self.index = index  # slot -> (block, page)
        done = np.frombuffer(buf[layout.done_offset:layout.done_offset + n], dtype=np.uint8)
        self.done: list[np.ndarray] = []
        pos = 0
        for count in layout.npages:
            self.done.append(done[pos:pos + count])
            pos += count
        self.data = np.frombuffer(buf[layout.data_offset:layout.data_offset + n * layout.slot_size],
                                  dtype=np.uint8).reshape(n, layout.slot_size)

    @classmethod
    def create(cls, layout: Layout) -> RescueLog:
        fd = os.memfd_create("mig:snapshot-rescue", os.MFD_CLOEXEC)
        os.ftruncate(fd, layout.size)
        return cls(layout, fd)

    @property
    def head(self) -> int:
        return int(self.counters[0])

    def publish(self, slot: int, block: int, page: int) -> None:
        """Fault server: the slot's data is in place; record its page, then make it visible."""
        self.index[slot, 0], self.index[slot, 1] = block, page
        self.counters[0] = slot + 1

    def release(self, first: int, last: int) -> None:
        """Migration thread: slots [first, last) are sent; give their memory back."""
        start = self.layout.data_offset + first * self.layout.slot_size
        end = self.layout.data_offset + last * self.layout.slot_size
        start, end = _up(start), end // _ALIGN * _ALIGN
        if end > start:
            self.map.madvise(mmap.MADV_REMOVE, start, end - start)

    def close(self) -> None:
        del self.counters, self.index, self.done, self.data
        try:
            self.map.close()
        except BufferError:  # a view is still referenced (a traceback's frame): the mapping goes with it
            pass
        os.close(self.fd)
