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


def test_no_pages_no_data():
    assert len(nonzero_pages(_words(8, [3]), np.arange(0), expect_zero=True)) == 0
