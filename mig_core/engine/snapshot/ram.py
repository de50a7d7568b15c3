"""A snapshot's RAM: every page that holds data handed to a backend's writer (several threads at once),
and read back straight into the blocks on load, with pages the snapshot does not hold cleared."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import structlog

from mig_core.errors import StreamError
from mig_core.ext.snapshot_backend import BlockShape, SnapshotReader, SnapshotWriter
from mig_core.machine.machine import Machine
from mig_core.memory.pagemap import runs_to_pages
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import nonzero_pages, scan_threads

log = structlog.get_logger("mig.snapshot")

#: Pages handed to the backend at once (4 MiB of 4 KiB pages): work for every thread, prompt pause/cancel.
CHUNK_PAGES = 1024


def shapes(machine: Machine) -> list[BlockShape]:
    return [BlockShape(b.name, b.size, b.page_size) for b in machine.blocks]


def _rows(block: RAMBlock, pages: np.ndarray) -> np.ndarray:
    """The pages' bytes: a view of RAM when they are one run (the machine is stopped), else a copy."""
    first, last = int(pages[0]), int(pages[-1])
    if last - first + 1 == len(pages):
        return block.pages[first:last + 1]
    return block.pages[pages]


def save_ram(machine: Machine, writer: SnapshotWriter, threads: int, checkpoint: Callable[[], None],
             progress: Callable[[int, int], None]) -> int:
    """Hand every non-zero page to ``writer`` from ``threads`` threads; returns the bytes handed over.

    ``checkpoint`` runs between chunks (a job's pause and cancel); pages in flight finish first.
    """
    total = sum(b.npages for b in machine.blocks)
    done = stored = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="mig/snapshot/save") as pool:
        inflight: deque[Future[None]] = deque()
        try:
            for b, shape in zip(machine.blocks, shapes(machine), strict=True):
                pages = b.populated_pages()  # never-touched pages are zero: not even read
                done += b.npages - len(pages)
                for i in range(0, len(pages), CHUNK_PAGES):
                    checkpoint()
                    part = nonzero_pages(b.words, pages[i:i + CHUNK_PAGES])
                    if len(part):
                        inflight.append(pool.submit(writer.put_pages, shape, part, _rows(b, part)))
                        stored += len(part) * b.page_size
                    while len(inflight) > 2 * threads:
                        inflight.popleft().result()
                    done += min(CHUNK_PAGES, len(pages) - i)
                    progress(done, total)
            while inflight:
                inflight.popleft().result()
        finally:
            for f in inflight:
                f.cancel()
    log.info("snapshot_ram_saved", bytes=stored, pages=total)
    return stored


def check_blocks(machine: Machine, saved: list[BlockShape]) -> None:
    """The snapshot's RAM blocks are this machine's (names, sizes, page sizes); StreamError if not."""
    local = {b.name: b for b in machine.blocks}
    for s in saved:
        b = local.get(s.name)
        if b is None:
            raise StreamError(f"the snapshot has RAM block '{s.name}' ({s.size} bytes), which this machine does "
                              "not have")
        if b.size != s.size:
            raise StreamError(f"RAM block '{s.name}' is {s.size} bytes in the snapshot but {b.size} here")
        if b.page_size != s.page_size:
            raise StreamError(f"RAM block '{s.name}' has page size {s.page_size} in the snapshot but "
                              f"{b.page_size} here")
    missing = sorted(set(local) - {s.name for s in saved})
    if missing:
        raise StreamError(f"this machine has RAM block '{missing[0]}', which the snapshot does not hold")


def load_ram(machine: Machine, reader: SnapshotReader, threads: int, checkpoint: Callable[[], None],
             progress: Callable[[int, int], None]) -> int:
    """Put the snapshot's pages into RAM (``threads`` readers) and clear every other page that holds data;
    returns the pages loaded."""
    saved = {s.name: s for s in reader.blocks()}
    total = sum(b.npages for b in machine.blocks)
    may_hold = machine.held_runs()  # before the pages land: a write witness ends first
    done = loaded = 0
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="mig/snapshot/load") as pool:
        for b in machine.blocks:
            shape = saved[b.name]
            held = runs_to_pages(*may_hold[b.name]) if b.name in may_hold else b.populated_pages()
            got = reader.stored_pages(shape)
            futures = []
            for i in range(0, len(got), CHUNK_PAGES):
                checkpoint()
                futures.append(pool.submit(reader.read_pages, shape, got[i:i + CHUNK_PAGES], b.view))
            for f in futures:
                f.result()
            mask = np.zeros(b.npages, dtype=bool)
            mask[got] = True
            stale = held[~mask[held]]
            if len(stale):
                stale = nonzero_pages(b.words, stale, expect_zero=True, threads=scan_threads())
            if len(stale):
                b.zero_pages(stale)
            loaded += len(got)
            done += b.npages
            progress(done, total)
    log.info("snapshot_ram_loaded", pages=loaded)
    return loaded
