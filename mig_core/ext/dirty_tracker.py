"""The dirty-tracking extension point: group ``mig_core.dirty_trackers``, base classes, selection.

Contract, for every tracker: a consumer's ``collect()`` returns every page
possibly written since that consumer's previous call (its first call: every
page that may not be zero); never one missed, a superset allowed. Several
consumers (a migration, calc-dirty-rate, dirty-limit) each get their own
bitmap; one never clears another's bits. A tracker that can tell which vCPU
wrote says so (``attributes_vcpus``) and reports per-vCPU page counts.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import structlog

from mig_core.memory.pagemap import runs_mask
from mig_core.memory.ram import RAMBlock
from mig_core.plugin.registry import PluginNotFound, PluginRegistry

log = structlog.get_logger("mig.dirty")


@dataclass
class DirtyReport:
    """One collect(): dirty page indices per block and, where known, pages written per vCPU."""

    pages: dict[str, np.ndarray]
    vcpu_pages: dict[int, int] | None = None

    @property
    def total(self) -> int:
        return sum(len(p) for p in self.pages.values())


class DirtyConsumer(ABC):
    """One user of a tracker, with its own view of what is dirty."""

    #: True if the sender must deliver copies and report them with ``sent()`` (content trackers).
    wants_copies: bool = False

    def __init__(self, tracker: DirtyTracker, name: str) -> None:
        self.tracker = tracker
        self.name = name

    @abstractmethod
    def collect(self) -> DirtyReport:
        """Every page possibly written since this consumer's last call (get-and-reset)."""

    def sent(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None:
        """The sender delivered exactly ``data`` (one row per page) for ``pages``; content trackers record it."""

    def close(self) -> None:
        self.tracker._remove(self)


class DirtyTracker(ABC):
    """A dirty-tracking method over a set of RAM blocks. Plugins subclass this."""

    #: The name in the ``mig_core.dirty_trackers`` group.
    name: ClassVar[str]
    #: False if collect() may report pages that were not written (a superset).
    exact: ClassVar[bool] = True
    #: True if it can say which vCPU wrote a page.
    attributes_vcpus: ClassVar[bool] = False
    #: Order of auto-selection: lower is tried first.
    preference: ClassVar[int] = 100

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        self.blocks = list(blocks)
        self._consumers: list[DirtyConsumer] = []
        self._lock = threading.Lock()

    @classmethod
    def unavailable(cls, blocks: Sequence[RAMBlock], host_marks_writes: bool) -> str | None:
        """Why this tracker cannot serve these blocks here (None if it can)."""
        return None

    def consumer(self, name: str, *, sends: bool = False, skip: Collection[str] = ()) -> DirtyConsumer:
        """A new consumer; ``sends`` if it delivers pages and reports them with ``sent()`` (a migration).

        ``skip`` names blocks whose pages this consumer will not use (x-ignore-shared): a tracker may save
        itself the work of reporting them (the first collect's scan of what is populated)."""
        c = self._make_consumer(name, sends, skip) if skip else self._make_consumer(name, sends)
        with self._lock:
            self._consumers.append(c)
        return c

    @abstractmethod
    def _make_consumer(self, name: str, sends: bool, skip: Collection[str] = ()) -> DirtyConsumer: ...

    def _remove(self, c: DirtyConsumer) -> None:
        with self._lock:
            if c in self._consumers:
                self._consumers.remove(c)

    def write_epoch(self) -> int | None:
        """A mark to check ``unwritten_since`` against later; None where this tracker cannot prove that memory
        went unwritten (the default: trackers that learn of writes only at a harvest, or from the host)."""
        return None

    def unwritten_since(self, epoch: int, block: RAMBlock, first: int, npages: int) -> bool:
        """True only if no page ``first`` to ``first + npages - 1`` of ``block`` has been written since
        ``write_epoch`` returned ``epoch``; False whenever that cannot be shown. Safe from any thread.

        What lets a multifd channel compress live RAM in place and keep the result
        (``Encoder.compress_parts_stable``): the proof is as strong as the tracker's own contract."""
        return False

    def release(self) -> None:
        """Let go of what this tracker holds on the blocks' memory (a userfaultfd registration), so another
        user of it can take it (a background snapshot). Until ``reacquire`` writes may go unseen; after it,
        every page counts as written once. Trackers that hold nothing keep tracking and do nothing here."""

    def reacquire(self) -> None:
        """Take the memory back after ``release``; the next harvest reports every page."""

    def close(self) -> None:
        """Stop tracking; consumers must not be used afterwards."""


# ---------------------------------------------------------------------------
# trackers with one get-and-reset source shared by all consumers


class _BitmapConsumer(DirtyConsumer):
    def __init__(self, tracker: HarvestingTracker, name: str, skip: Collection[str] = ()) -> None:
        super().__init__(tracker, name)
        # the first call reports everything that may not be zero
        self.bitmaps = {b.name: np.zeros(b.npages, dtype=bool) if b.name in skip
                        else runs_mask(*b.populated_runs(), b.npages) for b in tracker.blocks}
        self.vcpu_pages: dict[int, int] = {}

    def collect(self) -> DirtyReport:
        tracker = self.tracker
        assert isinstance(tracker, HarvestingTracker)
        with tracker._lock:
            tracker._harvest_into_consumers()
            pages = {name: np.flatnonzero(bm) for name, bm in self.bitmaps.items()}
            for bm in self.bitmaps.values():
                bm[:] = False
            vcpu = dict(self.vcpu_pages) if tracker.attributes_vcpus else None
            self.vcpu_pages.clear()
        return DirtyReport(pages, vcpu)


class HarvestingTracker(DirtyTracker):
    """A tracker whose source is read-and-reset once and fanned out to every consumer's bitmap."""

    @abstractmethod
    def harvest(self) -> tuple[dict[str, np.ndarray], dict[int, int]]:
        """Pages written since the last harvest per block (get-and-reset), and per-vCPU page counts."""

    def _make_consumer(self, name: str, sends: bool, skip: Collection[str] = ()) -> DirtyConsumer:
        with self._lock:
            # older consumers keep what was written before this one. With none, a harvest here would be
            # thrown away: the new consumer's first collect reports every populated page, which includes
            # every page written so far, and harvests then (one page-table walk of all RAM saved)
            if self._consumers:
                self._harvest_into_consumers()
        return _BitmapConsumer(self, name, skip)

    def _harvest_into_consumers(self) -> None:
        pages, vcpus = self.harvest()
        for c in self._consumers:
            assert isinstance(c, _BitmapConsumer)
            for name, idx in pages.items():
                c.bitmaps[name][idx] = True
            for v, n in vcpus.items():
                c.vcpu_pages[v] = c.vcpu_pages.get(v, 0) + n


# ---------------------------------------------------------------------------
# selection


GROUP = "mig_core.dirty_trackers"


@dataclass
class TrackerChoice:
    """The tracker class chosen and why each better one was passed over."""

    cls: type[DirtyTracker]
    skipped: dict[str, str] = field(default_factory=dict)


def load(registry: PluginRegistry, name: str) -> type[DirtyTracker]:
    """The tracker class serving ``name``; logs its class and distribution. ``PluginNotFound`` naming the
    group and the name if none does."""
    return registry.load_class(GROUP, name, DirtyTracker)


def select(blocks: Sequence[RAMBlock], registry: PluginRegistry, *, name: str | None = None,
           host_marks_writes: bool = False) -> TrackerChoice:
    """The named tracker, or the best installed one that works for these blocks here."""
    if name is not None:
        cls = load(registry, name)
        why = cls.unavailable(blocks, host_marks_writes)
        if why:
            raise ValueError(f"dirty tracker '{name}' cannot be used: {why}")
        return TrackerChoice(cls)
    skipped: dict[str, str] = {}
    candidates = []
    for n in registry.names(GROUP):
        try:
            candidates.append(load(registry, n))
        except PluginNotFound as e:
            skipped[n] = str(e)
    for cls in sorted(candidates, key=lambda c: (c.preference, c.name)):
        why = cls.unavailable(blocks, host_marks_writes)
        if why is None:
            log.info("dirty_tracker_selected", tracker=cls.name, skipped=skipped)
            return TrackerChoice(cls, skipped)
        skipped[cls.name] = why
    raise ValueError("no dirty tracker works here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
