"""Page hashes (xxh3-64), one per page: what content-based dirty detection compares."""

from __future__ import annotations

import numpy as np
import xxhash


def hash_pages(rows: np.ndarray) -> np.ndarray:
    """xxh3-64 of each row of a (n, page_size) uint8 array (hash copies: live pages may change meanwhile)."""
    out = np.empty(len(rows), dtype=np.uint64)
    if len(rows) == 0:
        return out
    mv = np.ascontiguousarray(rows).data.cast("B")
    ps = rows.shape[1]
    h = xxhash.xxh3_64_intdigest  # no batch form exists: one call per page, on the copy
    for i in range(len(rows)):
        out[i] = h(mv[i * ps:(i + 1) * ps])
    return out
