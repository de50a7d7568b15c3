"""hash: a page is dirty when its xxh3 hash differs from the hash of what the consumer last received.

Works everywhere (no kernel support, no host cooperation) and costs a hash of
every populated page per pass. A sending consumer records the hash of the exact
bytes it sent (``sent()``), so a page that changes and changes back before
the next pass is never missed: what counts is what the other side holds.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from mig_core.ext.dirty_tracker import DirtyConsumer, DirtyReport, DirtyTracker
from mig_core.memory.pagehash import hash_pages
from mig_core.memory.ram import RAMBlock

__all__ = ["HashTracker", "hash_pages"]

_CHUNK_PAGES = 4096  # pages copied (then hashed) at a time


class _HashConsumer(DirtyConsumer):
    def __init__(self, tracker: HashTracker, name: str, records_sent: bool) -> None:
        super().__init__(tracker, name)
        self.records_sent = records_sent
        self.wants_copies = records_sent
        # the other side starts with zero pages
        self.recorded = {b.name: np.full(b.npages, tracker.zero_hash[b.page_size], dtype=np.uint64)
                         for b in tracker.blocks}

    def collect(self) -> DirtyReport:
        t = self.tracker
        assert isinstance(t, HashTracker)
        pages = {}
        for b in t.blocks:
            current = np.full(b.npages, t.zero_hash[b.page_size], dtype=np.uint64)
            populated = b.populated_pages()
            view = b.pages
            for i in range(0, len(populated), _CHUNK_PAGES):
                idx = populated[i:i + _CHUNK_PAGES]
                current[idx] = hash_pages(view[idx])  # hash a copy: the page may change meanwhile
            rec = self.recorded[b.name]
            dirty = np.flatnonzero(current != rec)
            if not self.records_sent:
                rec[dirty] = current[dirty]
            pages[b.name] = dirty
        return DirtyReport(pages)

    def sent(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None:
        if self.records_sent:
            self.recorded[block.name][pages] = hash_pages(data)


class HashTracker(DirtyTracker):
    name = "hash"
    exact = True  # exact about content: it reports pages whose content differs from what was sent
    attributes_vcpus = False
    preference = 30

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        super().__init__(blocks)
        self.zero_hash = {b.page_size: int(hash_pages(np.zeros((1, b.page_size), np.uint8))[0]) for b in self.blocks}

    def _make_consumer(self, name: str, sends: bool, skip: Collection[str] = ()) -> DirtyConsumer:
        # ``skip`` only saves a tracker work; this one hashes what it is asked about and has none to save
        return _HashConsumer(self, name, records_sent=sends)
