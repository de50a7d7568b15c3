"""A destination's held pages: what its RAM held before loading, and dropping what the source never sends.

The source never sends a page it holds no data in, so such a page must end zero here. Reading every held,
unreceived page once the last page arrived kept a resuming destination waiting (36 ms per never-touched
GiB on 2 cores) after the source had completed. The source now names the pages it holds no data in at its
first sync (``UNPOPULATED``); those are read in the background while the stream loads, and only what the
background did not reach is read at the end, on every core. A page counts as it was when it was read, as
QEMU's destination counts a zero page as it was when the page arrived: nothing but the migration writes a
destination's RAM while it loads.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import structlog

from mig_core.errors import StreamError
from mig_core.memory.pagemap import pages_to_runs, runs_mask
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import nonzero_pages, scan_threads
from mig_core.stream.placement import PagePlacer

log = structlog.get_logger("mig.incoming")

#: pages the background reads between two looks at whether it should stop (64 MiB of 4 KiB pages)
CHUNK_PAGES = 16384

Runs = tuple[np.ndarray, np.ndarray]


def unpopulated(blocks: Sequence[RAMBlock], pending: Mapping[str, np.ndarray],
                skip: Collection[str] = ()) -> dict[str, Runs]:
    """The page runs the source holds no data in, per block with any: those its first sync did not report
    (``pending``, sorted pages). A block reported whole costs only a length check."""
    out: dict[str, Runs] = {}
    for b in blocks:
        pages = pending[b.name]
        if b.name in skip or len(pages) == b.npages:
            continue
        starts, ends = pages_to_runs(pages)
        gap_starts = np.concatenate(([0], ends))
        gap_ends = np.concatenate((starts, [b.npages]))
        keep = gap_starts < gap_ends
        out[b.name] = (gap_starts[keep], gap_ends[keep])
    return out


def encode_runs(runs: Mapping[str, Runs]) -> dict[str, list[bytes]]:
    """Half-open page runs per block as ``UNPOPULATED``'s argument: little-endian u64 starts and ends."""
    return {name: [s.astype("<u8").tobytes(), e.astype("<u8").tobytes()] for name, (s, e) in runs.items()}


def decode_runs(argument: object, blocks: Mapping[str, RAMBlock]) -> dict[str, Runs]:
    """``UNPOPULATED``'s argument checked against this host's blocks (StreamError naming what is wrong)."""
    if not isinstance(argument, dict):
        raise StreamError("UNPOPULATED: expected a map of block names to page runs")
    out: dict[str, Runs] = {}
    for name, pair in argument.items():
        b = blocks.get(name) if isinstance(name, str) else None
        if b is None:
            raise StreamError(f"UNPOPULATED: unknown RAM block {name!r}")
        if (not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(x, bytes) for x in pair)
                or len(pair[0]) != len(pair[1]) or len(pair[0]) % 8):
            raise StreamError(f"UNPOPULATED: malformed page runs for RAM block '{name}'")
        # checked as the unsigned numbers they are: a start of 2**63 or more would turn negative as int64
        starts = np.frombuffer(pair[0], dtype="<u8")
        ends = np.frombuffer(pair[1], dtype="<u8")
        if len(starts) and (not (starts < ends).all() or not (starts[1:] >= ends[:-1]).all()
                            or int(ends[-1]) > b.npages):
            raise StreamError(f"UNPOPULATED: page runs out of order or past the end of RAM block '{name}'")
        out[name] = (starts.astype(np.int64), ends.astype(np.int64))
    return out


class HeldPages:
    """The pages this host held before loading; drops the data of those the source never sent."""

    def __init__(self, blocks: Sequence[RAMBlock], held: Mapping[str, Runs]) -> None:
        self._blocks = {b.name: b for b in blocks}
        self._held = dict(held)
        #: per block: pages read in the background (mask) and which of them held data
        self._scanned: dict[str, np.ndarray] = {}
        #: written by the background thread only, read after it has stopped (``stop`` joins it)
        self._found: dict[str, list[np.ndarray]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan_unpopulated(self, unpopulated: Mapping[str, Runs], received: Mapping[str, np.ndarray]) -> None:
        """Start reading, on a thread of its own, the held pages the source holds no data in and that have
        not arrived; once per load (a second naming is refused)."""
        if self._scanned:
            raise StreamError("UNPOPULATED: sent twice in one stream")
        work = []
        for name, runs in unpopulated.items():
            b = self._blocks[name]
            if name not in self._held:  # held nothing, or a shared file that x-ignore-shared leaves alone
                continue
            want = runs_mask(*self._held[name], b.npages) & runs_mask(*runs, b.npages) & ~received[name]
            self._scanned[name] = np.zeros(b.npages, dtype=bool)
            self._found[name] = []
            pages = np.flatnonzero(want)
            if len(pages):
                work.append((b, pages))
        if work:
            log.debug("held_pages_scan_started", pages=sum(len(p) for _, p in work))
            self._thread = threading.Thread(target=self._scan, args=(work,), name="held-pages", daemon=True)
            self._thread.start()

    def _scan(self, work: list[tuple[RAMBlock, np.ndarray]]) -> None:
        try:
            for b, pages in work:
                for i in range(0, len(pages), CHUNK_PAGES):
                    if self._stop.is_set():
                        return
                    part = pages[i:i + CHUNK_PAGES]
                    self._found[b.name].append(nonzero_pages(b.words, part, expect_zero=True))
                    self._scanned[b.name][part] = True
        except Exception:  # noqa: BLE001 - what it did not mark as read is read again at the end
            log.exception("held_pages_scan_failed")

    def wait(self) -> None:
        """Until the background read is done (tests; the end does not wait for it, it stops it)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        """Stop the background read after its current chunk (the load ended or failed)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def drop_unsent(self, placer: PagePlacer, skip: Collection[str] = ()) -> tuple[int, int, int]:
        """After the last page: every held page that never arrived and holds data is zero now. Returns the
        pages read in the background, those read now, and those dropped."""
        self.stop()
        early = late = dropped = 0
        for b in placer.blocks:
            if b.name in skip:  # the same file as the source's: its contents are the data
                continue
            runs = self._held[b.name] if b.name in self._held else b.populated_runs()
            unsent = runs_mask(*runs, b.npages) & ~placer.received[b.name]
            stale = []
            scanned = self._scanned.get(b.name)
            if scanned is not None:
                early += int(np.count_nonzero(unsent & scanned))
                if self._found[b.name]:
                    found = np.concatenate(self._found[b.name])
                    stale.append(found[unsent[found]])  # held data and still not sent
                unsent &= ~scanned
            rest = np.flatnonzero(unsent)
            late += len(rest)
            if len(rest):
                # only pages that hold data need dropping: zero ones (a preallocated host) stay allocated
                stale.append(nonzero_pages(b.words, rest, expect_zero=True, threads=scan_threads()))
            pages = np.sort(np.concatenate(stale)) if stale else np.empty(0, dtype=np.int64)
            if len(pages):
                placer.place_zero(b, pages)
                dropped += len(pages)
        return early, late, dropped
