"""The reference host behind ``mig run``: RAM, a dirtying workload on vCPU threads, one device.

Each vCPU thread writes pages at its share of ``--dirty-rate``, walking a random
permutation of its own pages (distinct pages within a window, every page
rewritten over time), and keeps a record in page 0 of the first block: a
counter, a heartbeat (ns since the epoch) and the pages it wrote. So
continuation after migration and the true downtime can be read from memory.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import structlog

from mig_core.block.node import BlockNode
from mig_core.machine.device import Device, DeviceStateError
from mig_core.machine.machine import Machine
from mig_core.machine.reference_output import OutputDevice
from mig_core.machine.vcpu import Vcpu
from mig_core.memory.ram import Backing

log = structlog.get_logger("mig.run")

_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: per vCPU record in page 0 of the first block: counter, heartbeat ns, pages written, longest gap
#: between two heartbeats in ns (after a migration: the downtime the workload itself saw)
RECORD = struct.Struct("<QQQQ")
RECORD_STRIDE = 64
_WORD = struct.Struct("<Q")


def parse_size(text: str, what: str = "size") -> int:
    """``4096``, ``64K``, ``1.5G`` (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTB]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid {what} '{text}': use a number with an optional K, M, G or T suffix")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


@dataclass(frozen=True)
class RamSpec:
    name: str
    size: int
    page_size: int
    backing: Backing = Backing.ANONYMOUS
    path: str | None = None
    fd: int | None = None


def parse_ram(text: str, index: int) -> RamSpec:
    """``[NAME=]SIZE[,page-size=N][,backing=anonymous|memfd|file,path=PATH][,fd=N]`` (``fd``: a memfd
    passed in and kept by whoever started this host)."""
    main, *opts = text.split(",")
    name, eq, size = main.rpartition("=")
    if not eq:
        name = "pc.ram" if index == 0 else f"ram{index}"
    page_size = 4096
    backing = Backing.ANONYMOUS
    path = None
    fd = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "page-size":
            page_size = parse_size(value, "page size")
        elif key == "backing":
            if value not in ("anonymous", "memfd", "file"):
                raise ValueError(f"invalid --ram backing '{value}' (anonymous, memfd or file)")
            backing = Backing(value)
        elif key == "path":
            path = value
        elif key == "fd":
            if not value.isdigit():
                raise ValueError(f"--ram: fd={value} is not a descriptor number")
            fd = int(value)
        else:
            raise ValueError(f"unknown --ram option '{key}' (known: page-size, backing, path, fd)")
    if (backing is Backing.FILE) != (path is not None):
        raise ValueError("--ram: backing=file needs path=PATH, and path= only goes with backing=file")
    if fd is not None and backing is not Backing.MEMFD:
        raise ValueError("--ram: fd=N goes only with backing=memfd")
    return RamSpec(name, parse_size(size, "RAM size"), page_size, backing, path, fd)


#: Bytes filled at a time: the temporaries of a fill never exceed this, whatever the RAM size.
FILL_CHUNK = 64 << 20
_WORDS = np.frombuffer(b"migrate live state of running programs between hosts quickly and safely ", np.uint8)


def _fill_block(a: np.ndarray, how: str, rng: np.random.Generator) -> None:
    """Fill one block chunk by chunk, so a fill costs the RAM itself and one chunk more."""
    if how == "text":
        step = len(_WORDS) * (FILL_CHUNK // len(_WORDS))  # whole sentences: every chunk starts in phase
        pattern = np.tile(_WORDS, FILL_CHUNK // len(_WORDS))
        for o in range(0, a.size, step):
            n = min(step, a.size - o)
            a[o:o + n] = pattern[:n]
            first = (-o) % 997  # every 997th byte of the block: a random capital letter
            a[o + first:o + n:997] = rng.integers(0x41, 0x5B, len(range(first, n, 997)), dtype=np.uint8)
        return
    end = a.size if how == "random" else a.size // 2
    for o in range(0, end, FILL_CHUNK):
        n = min(FILL_CHUNK, end - o)
        a[o:o + n] = rng.integers(0, 256, n, dtype=np.uint8)


def fill(machine: Machine, how: str, seed: int = 1) -> None:
    """``zero`` (never touched), ``random``, ``half`` (first half random, second zero), ``text``."""
    if how not in ("zero", "random", "half", "text"):
        raise ValueError(f"unknown fill '{how}' (zero, random, half, text)")
    rng = np.random.default_rng(seed)
    for b in machine.blocks:
        if how == "zero":
            continue
        _fill_block(b.array, how, rng)
        machine.mark_pages(b.name, np.arange(b.npages))
    if how != "zero":  # "zero" touches nothing (a file-backed block keeps what its file holds)
        machine.blocks[0].array[:RECORD_STRIDE * 64] = 0  # the vCPU records start from zero


class CounterStateV1(msgspec.Struct, forbid_unknown_fields=True):
    """What a version-1 ``mig-run-counter`` section holds."""

    ticks: Annotated[int, msgspec.Meta(ge=0)]
    config: dict[str, int]


class CounterDevice(Device):
    """The reference host's device: a tick counter and its configuration."""

    id = "mig-run-counter"
    version = 1
    state_type = CounterStateV1

    def __init__(self, vcpus: int, dirty_rate: int) -> None:
        self.ticks = 0
        self.config = {"vcpus": vcpus, "dirty-rate": dirty_rate}
        self.lock = threading.Lock()

    def tick(self) -> None:
        with self.lock:
            self.ticks += 1

    def save_state(self) -> Any:
        with self.lock:
            return {"ticks": self.ticks, "config": self.config}

    def load_state(self, state: CounterStateV1, version: int) -> None:
        if state.config != self.config:
            raise DeviceStateError(f"mig-run-counter: the source ran with {state.config}, this host with "
                                   f"{self.config}")
        with self.lock:
            self.ticks = state.ticks


class FailoverPrimary(Device):
    """A passthrough NIC paired with a standby (QEMU's virtio-net failover primary): its state cannot
    migrate, so before a migration the source asks the "guest" to unplug it, which takes ``unplug_ms``;
    once gone it is no longer one of the machine's devices. A migration that fails or is cancelled
    plugs it back."""

    version = 1

    def __init__(self, machine: Machine, device_id: str, unplug_ms: int) -> None:
        self.id = device_id
        self.machine = machine
        self.unplug_ms = unplug_ms
        self._gone = threading.Event()
        self._timer: threading.Timer | None = None

    def unplug_before_migration(self) -> bool:
        self._gone.clear()
        self._timer = threading.Timer(self.unplug_ms / 1000, self._unplugged)
        self._timer.daemon = True
        self._timer.start()
        return True

    def _unplugged(self) -> None:
        self.machine.devices.unregister(self)
        self._gone.set()

    def unplug_pending(self) -> bool:
        return not self._gone.is_set()

    def replug(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.machine.devices.get(self.id, self.instance) is None:
            self.machine.add_device(self)
        self._gone.clear()

    @property
    def plugged(self) -> bool:
        return self.machine.devices.get(self.id, self.instance) is self


#: What the workload writes to a drive at once.
DRIVE_BLOCK = 4096


class Workload:
    """vCPU threads that dirty memory at a set rate and keep their records in RAM."""

    def __init__(self, machine: Machine, rates: list[float], device: CounterDevice,
                 drives: list[tuple[BlockNode, float]] | None = None, output: OutputDevice | None = None) -> None:
        """``rates``: bytes per second each vCPU dirties; ``drives``: block nodes vCPU 0 writes, bytes per
        second each (4 KiB writes at random aligned offsets, through the node so its bitmaps see them)."""
        self.machine = machine
        self.drives = drives or []
        self._drive_rng = np.random.default_rng()  # vCPU 0 alone draws from it
        self.nvcpus = len(rates)
        self.rates = rates
        vcpus = self.nvcpus
        self.device = device
        #: the message generator vCPU 0 drives (mig run --output)
        self.output = output
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        #: reads that did not return what this workload had just written (logged: workload_inconsistent)
        self.inconsistent = 0
        if RECORD_STRIDE * vcpus > machine.blocks[0].page_size:
            raise ValueError(f"at most {machine.blocks[0].page_size // RECORD_STRIDE} vCPUs fit the record page")

    def start(self) -> None:
        self.threads = self.machine.vcpus.run(self._vcpu, self.nvcpus, name="vcpu")

    def _pages_of(self, index: int) -> list[tuple[str, np.ndarray]]:
        """This vCPU's pages (every nvcpus-th page of each block; never the record page), permuted."""
        rng = np.random.default_rng(100 + index)
        out = []
        for bi, b in enumerate(self.machine.blocks):
            pages = np.arange(index, b.npages, self.nvcpus)
            if bi == 0:
                pages = pages[pages != 0]
            out.append((b.name, rng.permutation(pages)))
        return out

    def _vcpu(self, v: Vcpu) -> None:
        m = self.machine
        rec = m.blocks[0].view[v.index * RECORD_STRIDE:v.index * RECORD_STRIDE + RECORD.size]
        mine = self._pages_of(v.index)
        share = self.rates[v.index] if v.index < self.nvcpus else 0.0
        pos = [0] * len(mine)
        written = 0.0
        owed = [0.0] * len(self.drives)
        last = time.monotonic()
        slept = v.throttled_seconds
        while not self.stop.is_set():
            v.safe_point()
            counter, hb, pages, gap = RECORD.unpack_from(rec)
            t_ns = time.time_ns()
            if hb:
                gap = max(gap, t_ns - hb)
            now = time.monotonic()
            # writes owed since the last tick, but never a backlog from time spent stopped or throttled: a
            # throttled vCPU loses the time it sleeps, as a busy guest's does (what auto-converge counts on)
            ran = now - last - (v.throttled_seconds - slept)
            written += share * min(max(ran, 0.0), 0.01) / m.blocks[0].page_size
            last, slept = now, v.throttled_seconds
            n = int(written)
            if n and share:
                written -= n
                bi = int(np.random.default_rng().integers(len(mine))) if len(mine) > 1 else 0
                name, perm = mine[bi]
                if len(perm):
                    take = np.take(perm, np.arange(pos[bi], pos[bi] + n), mode="wrap")
                    pos[bi] = (pos[bi] + n) % len(perm)
                    b = m.block(name)
                    ps = b.page_size
                    # plain Python first (it holds the GIL, even while it waits for a postcopy page),
                    # then numpy; then read one page back the plain way: it must hold what was written
                    _ = b.view[int(take[-1]) * ps + 8]
                    b.array.view(np.uint64).reshape(b.npages, -1)[take, 0] = counter
                    m.mark_pages(name, take)
                    (seen,) = _WORD.unpack_from(b.view, int(take[0]) * ps)
                    if seen != counter:
                        self.inconsistent += 1
                        log.error("workload_inconsistent", vcpu=v.index, block=name, page=int(take[0]),
                                  wrote=counter, read=seen)
            RECORD.pack_into(rec, 0, counter + 1, t_ns, pages + n, gap)
            m.mark_dirty(m.blocks[0].name, v.index * RECORD_STRIDE, RECORD.size)
            if v.index == 0:
                self.device.tick()
                if self.output is not None:
                    for packet in self.output.step(min(max(ran, 0.0), 0.01)):
                        m.output.emit(packet)
                owed = self._write_drives(owed, min(max(ran, 0.0), 0.01), counter)
            v.idle(0.001 if share else 0.005)  # an idle workload wakes less often; a stop wakes it at once

    def _write_drives(self, owed: list[float], ran: float, counter: int) -> list[float]:
        """Write what each drive is owed for ``ran`` seconds, in 4 KiB blocks stamped with ``counter``."""
        for i, (node, rate) in enumerate(self.drives):
            owed[i] += rate * ran
            blocks = node.size // DRIVE_BLOCK
            while owed[i] >= DRIVE_BLOCK and blocks:
                owed[i] -= DRIVE_BLOCK
                at = int(self._drive_rng.integers(blocks)) * DRIVE_BLOCK
                node.write(at, counter.to_bytes(8, "little") * (DRIVE_BLOCK // 8))
        return owed

    def records(self) -> list[tuple[int, int, int, int]]:
        """(counter, heartbeat ns, pages written, longest gap ns) of each vCPU, read from RAM."""
        view = self.machine.blocks[0].view
        return [RECORD.unpack_from(view, i * RECORD_STRIDE) for i in range(self.nvcpus)]
