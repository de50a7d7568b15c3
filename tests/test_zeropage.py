"""The zero tests over a block's words: both ways of finding the pages that hold data agree."""

from __future__ import annotations

import numpy as np
import pytest

from mig_core.memory.zeropage import nonzero_pages, zero_mask


def _words(npages: int, data_pages: list[int], word: int = 0) -> np.ndarray:
    w = np.zeros((npages, 512), dtype=np.uint64)
    for p in data_pages:
        w[p, word] = p + 1
    return w


@pytest.mark.parametrize("data_pages", [[], [0], [77], [511, 512], [1023], list(range(0, 1024, 97))])
@pytest.mark.parametrize("word", [0, 511])  # the first word of a page, and its last (the first-word test misses it)
@pytest.mark.parametrize("pages", ["all", "every other", "a run with a gap"])
def test_expecting_zero_finds_the_same_pages(data_pages, word, pages):
    """A preallocated destination ORs whole runs first (expect_zero); it must find exactly the pages the
    page-by-page test finds, in chunks that are runs and chunks that are not."""
    w = _words(1024, data_pages, word)
    idx = {"all": np.arange(1024), "every other": np.arange(0, 1024, 2),
           "a run with a gap": np.concatenate([np.arange(0, 300), np.arange(301, 1024)])}[pages]
    want = idx[np.isin(idx, data_pages)]
    for chunk in (64, 1000, 16384):
        assert np.array_equal(nonzero_pages(w, idx, chunk, expect_zero=True), want)
        assert np.array_equal(nonzero_pages(w, idx, chunk), want)
    assert np.array_equal(idx[~zero_mask(w, idx)], want)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_find_the_same_pages_in_order(threads):
    """A scan split over threads (a destination waiting to resume) answers exactly as one thread does:
    data in the first, a middle and the last chunk, in a run and in a set with gaps."""
    rng = np.random.default_rng(7)
    data = sorted({0, 4095, 2 * 4096 + 17, 5 * 4096 - 1, *rng.choice(5 * 4096, 40, replace=False).tolist()})
    w = _words(5 * 4096, data, word=511)
    for idx in (np.arange(5 * 4096), np.flatnonzero(rng.random(5 * 4096) < 0.7)):
        want = idx[np.isin(idx, data)]
        got = nonzero_pages(w, idx, 1024, expect_zero=True, threads=threads)
        assert np.array_equal(got, want) and len(want) > 10
        assert np.array_equal(nonzero_pages(w, idx, 1024, threads=threads), want)


def test_no_pages_no_data():
    assert len(nonzero_pages(_words(8, [3]), np.arange(0), expect_zero=True)) == 0
