"""calc-dirty-rate / query-dirty-rate: how fast the program dirties memory, three ways (QEMU's modes).

* ``page-sampling`` hashes ``sample-pages`` random pages per GiB, waits, hashes them again and
  scales the share that changed to the sampled RAM;
* ``dirty-bitmap`` counts the pages the dirty tracker reports over the period;
* ``dirty-ring`` counts per vCPU (needs a tracker that attributes writes to vCPUs) and reports
  each vCPU's rate beside their sum.

Rates are MiB/s. The measurement runs in its own thread; the command returns at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from mig_core.errors import QMPError
from mig_core.machine.machine import Machine
from mig_core.memory.pagehash import hash_pages
from mig_core.schema.migration import DirtyRateInfo, DirtyRateMeasureMode, DirtyRateStatus, DirtyRateVcpu, TimeUnit

log = structlog.get_logger("mig.dirtyrate")

MIN_SAMPLED_BLOCK = 128 << 10  # blocks smaller than this are not sampled (QEMU's 128 "MB" in KiB units)
DEFAULT_SAMPLE_PAGES = 512
_MIB = 1 << 20


@dataclass
class _Result:
    status: DirtyRateStatus = DirtyRateStatus.UNSTARTED
    start_time: int = 0
    calc_time_ms: int = 0
    sample_pages: int = 0
    mode: DirtyRateMeasureMode = DirtyRateMeasureMode.PAGE_SAMPLING
    dirty_rate: int | None = None
    vcpu_rates: list[tuple[int, int]] = field(default_factory=list)


class DirtyRateMeter:
    """One machine's dirty-rate measurement (at most one at a time)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._result = _Result()
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def threads(self) -> list[threading.Thread]:
        """The measuring thread, while there is one."""
        return [self.thread] if self.thread is not None else []

    def calc(self, calc_time: int, unit: TimeUnit | None, sample_pages: int | None,
             mode: DirtyRateMeasureMode | None) -> None:
        """Start a measurement, with QEMU's checks in QEMU's order."""
        mode = mode or DirtyRateMeasureMode.PAGE_SAMPLING
        with self._lock:
            if self._result.status is DirtyRateStatus.MEASURING:
                raise QMPError("the dirty rate is already being measured.")
            ms = calc_time * (1000 if (unit or TimeUnit.SECOND) is TimeUnit.SECOND else 1)
            if not 50 <= ms <= 60000:
                raise QMPError("Calculation time is out of range [50ms, 60000ms].")
            if sample_pages is not None and mode is not DirtyRateMeasureMode.PAGE_SAMPLING:
                raise QMPError("sample-pages is used only in page-sampling mode")
            pages = DEFAULT_SAMPLE_PAGES if sample_pages is None else sample_pages
            if not 128 <= pages <= 16384:
                raise QMPError("sample-pages is out of range[128, 16384].")
            if mode is not DirtyRateMeasureMode.PAGE_SAMPLING:
                try:
                    tracker_cls = self.machine.tracker_class()
                except ValueError:
                    tracker_cls = None
                if tracker_cls is None or (mode is DirtyRateMeasureMode.DIRTY_RING
                                           and not tracker_cls.attributes_vcpus):
                    raise QMPError(f"mode {mode.value} is not enabled, use other method instead.")
            self._result = _Result(DirtyRateStatus.MEASURING, int(time.time()), ms,
                                   pages if mode is DirtyRateMeasureMode.PAGE_SAMPLING else 0, mode)
            self.thread = threading.Thread(target=self._measure, args=(ms, pages, mode), name="get_dirty_rate",
                                           daemon=True)
            self.thread.start()
        log.info("dirty_rate_measuring", mode=mode.value, ms=ms, sample_pages=pages)

    def _measure(self, ms: int, sample_pages: int, mode: DirtyRateMeasureMode) -> None:
        try:
            if mode is DirtyRateMeasureMode.PAGE_SAMPLING:
                rate, vcpus, elapsed = self._sample(ms, sample_pages)
            else:
                rate, vcpus, elapsed = self._tracked(ms, mode is DirtyRateMeasureMode.DIRTY_RING)
        except Exception as e:  # noqa: BLE001 - a failed measurement reports -1, never kills the host
            log.exception("dirty_rate_failed", error=str(e))
            rate, vcpus, elapsed = -1, [], ms
        with self._lock:
            r = self._result
            r.dirty_rate, r.vcpu_rates, r.calc_time_ms = rate, vcpus, int(elapsed)
            r.status = DirtyRateStatus.MEASURED
        log.info("dirty_rate_measured", mode=mode.value, dirty_rate=rate, vcpus=vcpus)

    def _sample(self, ms: int, sample_pages: int) -> tuple[int, list[tuple[int, int]], float]:
        rng = np.random.default_rng()
        samples = []
        for b in self.machine.blocks:
            if b.size < MIN_SAMPLED_BLOCK or b.npages < 2:
                continue
            count = max(1, b.size * sample_pages // (1 << 30))
            idx = rng.integers(0, b.npages - 1, count)
            samples.append((b, idx, hash_pages(b.pages[idx])))
        t0 = time.monotonic()
        time.sleep(ms / 1000)
        elapsed = (time.monotonic() - t0) * 1000
        if not samples:
            return -1, [], elapsed
        total = changed = 0
        sampled_mib = 0.0
        for b, idx, before in samples:
            changed += int((hash_pages(b.pages[idx]) != before).sum())
            total += len(idx)
            sampled_mib += b.size / _MIB
        return int(changed * sampled_mib * 1000 / (total * elapsed)), [], elapsed

    def _tracked(self, ms: int, per_vcpu: bool) -> tuple[int, list[tuple[int, int]], float]:
        consumer = self.machine.tracker().consumer("calc-dirty-rate")
        try:
            consumer.collect()  # the first report says what may be non-zero, not what was written
            t0 = time.monotonic()
            time.sleep(ms / 1000)
            report = consumer.collect()
            elapsed = (time.monotonic() - t0) * 1000
        finally:
            consumer.close()
        page = self.machine.blocks[0].page_size if self.machine.blocks else 4096
        if per_vcpu:
            counts = report.vcpu_pages or {}
            vcpus = [(v.index, int(counts.get(v.index, 0) * page / _MIB * 1000 / elapsed))
                     for v in sorted(self.machine.vcpus.vcpus, key=lambda v: v.index)]
            return sum(r for _, r in vcpus), vcpus, elapsed
        return int(report.total * page / _MIB * 1000 / elapsed), [], elapsed

    def query(self, unit: TimeUnit | None) -> DirtyRateInfo:
        unit = unit or TimeUnit.SECOND
        with self._lock:
            r = self._result
            calc = r.calc_time_ms // 1000 if unit is TimeUnit.SECOND else r.calc_time_ms
            info = DirtyRateInfo(status=r.status, start_time=r.start_time, calc_time=calc, calc_time_unit=unit,
                                 sample_pages=r.sample_pages, mode=r.mode)
            if r.status is DirtyRateStatus.MEASURED and r.dirty_rate is not None:
                info.dirty_rate = r.dirty_rate
            if r.status is DirtyRateStatus.MEASURED and r.mode is DirtyRateMeasureMode.DIRTY_RING:
                info.vcpu_dirty_rate = [DirtyRateVcpu(id=i, dirty_rate=v) for i, v in r.vcpu_rates]
            return info

