"""Measure a program's dirty curve: distinct bytes it dirties within windows of growing length.

A migration pass of length t finds the pages written in t, each counted once: a program that rewrites a
small hot set dirties far less per pass than its write rate says, one that walks its RAM dirties all it
writes. So the advisor measures the curve, not one rate: a tracker consumer collects every ``step``
seconds for the whole period, and the union of k consecutive collections is the dirty set of a window of
k steps (averaged over where the window starts). Without a tracker, calc-dirty-rate's page sampling gives
one point (a window of the whole period).
"""

from __future__ import annotations

import time

import numpy as np

from mig_core.engine.advisor import DirtyCurve
from mig_core.machine.machine import Machine
from mig_core.memory.pagehash import hash_pages

#: windows of 1, 2, 4, … steps up to the whole period
STEP_S = 0.05
_SAMPLE_PAGES_PER_GIB = 4096


def ram_bytes(machine: Machine) -> int:
    return sum(b.size for b in machine.blocks)


def measure(machine: Machine, seconds: float, step: float = STEP_S) -> DirtyCurve:
    """The curve over ``seconds`` (the tracker's when the machine has one, else sampled)."""
    try:
        machine.tracker_class()
    except (ValueError, LookupError):
        return _sampled(machine, seconds)
    return _tracked(machine, seconds, step)


def _tracked(machine: Machine, seconds: float, step: float) -> DirtyCurve:
    consumer = machine.tracker().consumer("advisor")
    windows: list[dict[str, np.ndarray]] = []
    try:
        consumer.collect()  # the first report says what may be non-zero, not what was written
        t0 = time.monotonic()
        start = t0
        n = max(1, round(seconds / step))
        for i in range(1, n + 1):
            time.sleep(max(0.0, t0 + i * step - time.monotonic()))
            windows.append(consumer.collect().pages)
        elapsed = time.monotonic() - start
    finally:
        consumer.close()
    step = elapsed / len(windows)  # what the steps really lasted (sleeps overrun on a busy machine)
    page = {b.name: b.page_size for b in machine.blocks}
    n = len(windows)
    points = []
    for k in sorted({*(1 << i for i in range(n.bit_length()) if 1 << i <= n), n}):  # 1, 2, 4, …, n steps
        sizes = [sum(len(np.unique(np.concatenate([w[name] for w in windows[first:first + k]]))) * page[name]
                     for name in page) for first in range(0, n - k + 1, k)]
        points.append((k * step, float(np.mean(sizes))))
    return DirtyCurve(_increasing(points), float(ram_bytes(machine)))


def _increasing(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Averages of noisy windows may dip: a longer window never holds fewer distinct pages."""
    out: list[tuple[float, float]] = []
    for t, b in points:
        out.append((t, max(b, out[-1][1] if out else 0.0)))
    return tuple(out)


def _sampled(machine: Machine, seconds: float) -> DirtyCurve:
    rng = np.random.default_rng()
    samples = []
    for b in machine.blocks:
        if b.npages < 2:
            continue
        count = max(64, min(b.npages, b.size * _SAMPLE_PAGES_PER_GIB // (1 << 30)))
        idx = np.unique(rng.integers(0, b.npages, count))
        samples.append((b, idx, hash_pages(b.pages[idx])))
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    dirty = sum(float((hash_pages(b.pages[idx]) != before).mean()) * b.size for b, idx, before in samples)
    return DirtyCurve(((elapsed, dirty),), float(ram_bytes(machine)))
