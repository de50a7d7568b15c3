"""The device contract end to end: a device with 64 MiB of iterative state that changes while it migrates.

Two machines migrate in one process (``mig_core.testing``'s loopback transport). The device's pending
bytes must hold the switchover back while the program keeps changing it, count in expected-downtime,
and its iterate time and bytes must show in the passes; the destination's copy must be exact.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import numpy as np

from mig_core.control.manager import MigrationManager
from mig_core.machine.device import Device, PendingState
from mig_core.machine.machine import Machine
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationStatus
from mig_core.schema.parameters import MigrateSetParameters
from mig_core.testing import LoopbackTransport, wait_until

SIZE = 64 << 20
CHUNK = 512 << 10
NCHUNKS = SIZE // CHUNK
HEADER = struct.Struct("<I")
#: what one chunk costs on the wire (its index, then its bytes)
PIECE = HEADER.size + CHUNK


class Journal(Device):
    """64 MiB in 512 KiB chunks; a chunk the program rewrites is sent again (the device's own dirty set).

    While ``writing`` is set the "program" rewrites one chunk each time the engine asks what is pending,
    so every pass ends with state still to send: the migration cannot converge until the test clears it.
    Chunks below the middle are must-precopy, the others can-postcopy (precopy must send both).
    """

    id = "journal"
    state_type = dict[int, bytes]

    def __init__(self, seed: int | None) -> None:
        self.buf = np.zeros(SIZE, dtype=np.uint8)
        self.lock = threading.Lock()
        self.dirty: set[int] = set()
        self.writing = threading.Event()
        self.rng = np.random.default_rng(seed)
        if seed is not None:
            self.buf[:] = self.rng.integers(0, 256, SIZE, dtype=np.uint8)
        self.pending_calls = 0
        self.next_write = 0
        self.iterate_ms = 0.0
        self.iterate_bytes = 0
        self.writing_at_switchover: bool | None = None

    # -- source ----------------------------------------------------------------------

    def save_setup(self) -> None:
        with self.lock:
            self.dirty = set(range(NCHUNKS))

    def state_pending(self) -> PendingState:
        with self.lock:
            self.pending_calls += 1
            if self.writing.is_set():
                i = self.next_write % NCHUNKS
                self.next_write += 1
                self.buf[i * CHUNK:(i + 1) * CHUNK] = self.rng.integers(0, 256, CHUNK, dtype=np.uint8)
                self.dirty.add(i)
            low = sum(1 for i in self.dirty if i < NCHUNKS // 2)
            return PendingState(must_precopy=low * PIECE, can_postcopy=(len(self.dirty) - low) * PIECE)

    def save_iterate(self, max_bytes: int) -> bytes | None:
        t0 = time.monotonic()
        with self.lock:
            if not self.dirty or max_bytes < PIECE:
                return None
            i = min(self.dirty)
            self.dirty.discard(i)
            piece = HEADER.pack(i) + self.buf[i * CHUNK:(i + 1) * CHUNK].tobytes()
        self.iterate_bytes += len(piece)
        self.iterate_ms += (time.monotonic() - t0) * 1000
        return piece

    def save_state(self) -> Any:
        with self.lock:
            self.writing_at_switchover = self.writing.is_set()
            rest = {i: self.buf[i * CHUNK:(i + 1) * CHUNK].tobytes() for i in sorted(self.dirty)}
            self.dirty.clear()
            return rest

    # -- destination -------------------------------------------------------------------

    def load_iterate(self, chunk: bytes) -> None:
        (i,) = HEADER.unpack_from(chunk)
        self.buf[i * CHUNK:(i + 1) * CHUNK] = np.frombuffer(chunk, dtype=np.uint8, offset=HEADER.size)

    def load_state(self, state: dict[int, bytes], version: int) -> None:
        for i, data in state.items():
            self.buf[i * CHUNK:(i + 1) * CHUNK] = np.frombuffer(data, dtype=np.uint8)


def test_iterative_device_state_arrives_exact_and_holds_switchover_back():
    src_m = Machine(runstate=RunState.RUNNING)
    src_m.add_ram("ram0", 1 << 20)
    dst_m = Machine(runstate=RunState.INMIGRATE)
    dst_m.add_ram("ram0", 1 << 20)
    src_dev, dst_dev = Journal(seed=14), Journal(seed=None)
    src_m.add_device(src_dev)
    dst_m.add_device(dst_dev)
    src, dst = MigrationManager(src_m), MigrationManager(dst_m)
    # switchover may go at 1000 bytes/ms: with downtime-limit 300 ms that is less than one chunk, so any
    # chunk still pending at the end of a pass keeps the source iterating
    src.migrate_set_parameters(MigrateSetParameters(avail_switchover_bandwidth=1_000_000))
    src_dev.writing.set()
    transport = LoopbackTransport()
    try:
        dst.migrate_incoming_with(transport, transport.address(), exit_on_error=False)
        src.migrate_with(transport, transport.address())
        out = src.outgoing
        assert out is not None
        # a few passes while the program keeps rewriting: none of them may switch over
        wait_until(lambda: len(out.stats().passes) >= 4 or src.source.state not in (MigrationStatus.SETUP,
                                                                                       MigrationStatus.ACTIVE),
                   timeout=120)
        assert src.source.state is MigrationStatus.ACTIVE, src.error_desc
        info = src.query_migrate()
        # at least one chunk was pending at the last sync, and it counts in the expected downtime
        assert info.expected_downtime >= PIECE // 1000
        src_dev.writing.clear()
        assert src.source.wait_for({MigrationStatus.COMPLETED, MigrationStatus.FAILED}, 120)
        assert src.source.state is MigrationStatus.COMPLETED, src.error_desc
        assert dst.destination.wait_for({MigrationStatus.COMPLETED, MigrationStatus.FAILED}, 60)
        assert dst.destination.state is MigrationStatus.COMPLETED, dst.error_desc

        assert src_dev.writing_at_switchover is False
        assert np.array_equal(src_dev.buf, dst_dev.buf)
        passes = out.stats().passes
        assert len(passes) >= 4
        # the whole device went through save_iterate at least once, and every pass that iterated reports it
        assert sum(p.device_bytes for p in passes) == src_dev.iterate_bytes >= SIZE
        assert sum(p.device_iterate_ms for p in passes) >= src_dev.iterate_ms * 0.999
        assert all(p.ms >= p.device_iterate_ms for p in passes)
    finally:
        src_m.close()
        dst_m.close()
