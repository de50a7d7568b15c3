"""Dirty limit: hold each vCPU to a dirty rate (MB/s) by throttling that vCPU alone.

QEMU measures each vCPU through the KVM dirty ring and makes it sleep whenever
its ring fills. mig measures each vCPU through a tracker that attributes
writes to vCPUs (the ``host`` tracker, or vCPU threads that report their
writes) and makes that vCPU sleep a share of every run slice at its safe
points. A controller thread re-measures every period and steps each limited
vCPU's share up or down, QEMU's way (a proportional step when far from the
quota, a tenth of a step when close, nothing within tolerance).
"""

from __future__ import annotations

import threading
import time

import structlog

from mig_core.errors import QMPError
from mig_core.ext.dirty_tracker import DirtyConsumer
from mig_core.machine.machine import Machine
from mig_core.schema.migration import DirtyLimitInfo

log = structlog.get_logger("mig.dirtylimit")

_MB = 1_000_000
NEEDS_ATTRIBUTION = ("dirty page limit requires per-vCPU dirty page attribution "
                     "(the 'host' dirty tracker or vCPU threads that report their writes)")
#: Pages in mig's notion of a "dirty ring" (what dirty-limit-ring-full-time is measured against).
RING_PAGES = 4096


class DirtyLimiter:
    """Per-vCPU dirty-rate quotas and the controller that enforces them."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.quota: dict[int, int] = {}  # vCPU index -> MB/s
        self.current: dict[int, int] = {}  # measured MB/s
        self.period_ms = 1000
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumer: DirtyConsumer | None = None

    # -- QMP ------------------------------------------------------------------

    def _check(self, cpu_index: int | None) -> list[int]:
        try:
            attributes = self.machine.tracker_class().attributes_vcpus
        except ValueError:
            attributes = False
        if not attributes:
            hint = self.machine.attribution_hint
            raise QMPError(NEEDS_ATTRIBUTION + (f"; {hint}" if hint else ""))
        indexes = sorted(v.index for v in self.machine.vcpus.vcpus)
        if cpu_index is None:
            return indexes
        if cpu_index not in indexes:
            raise QMPError("incorrect cpu index specified")
        return [cpu_index]

    def set_limit(self, cpu_index: int | None, rate: int) -> None:
        """``set-vcpu-dirty-limit``: a rate of 0 cancels."""
        if rate == 0:
            self.cancel(cpu_index)
            return
        targets = self._check(cpu_index)
        with self._lock:
            for i in targets:
                self.quota[i] = rate
        self._ensure_running()
        log.info("dirty_limit_set", vcpus=targets, mb_per_s=rate)

    def cancel(self, cpu_index: int | None) -> None:
        """``cancel-vcpu-dirty-limit``; without attribution there is nothing to cancel (QEMU: silent)."""
        try:
            targets = self._check(cpu_index)
        except QMPError as e:
            if e.desc.startswith(NEEDS_ATTRIBUTION):
                return
            raise
        with self._lock:
            for i in targets:
                self.quota.pop(i, None)
                self.machine.vcpus.set_vcpu_throttle(i, 0)
            empty = not self.quota
        if empty:
            self.stop()

    def limits(self) -> tuple[dict[int, int], int]:
        """The quotas set now and the controller's period: what ``restore`` puts back."""
        with self._lock:
            return dict(self.quota), self.period_ms

    def restore(self, saved: tuple[dict[int, int], int]) -> None:
        """Put back quotas and period taken with ``limits`` (what an operator had before a migration)."""
        quotas, period = saved
        with self._lock:
            for i in list(self.quota):
                if i not in quotas:
                    self.quota.pop(i)
                    self.machine.vcpus.set_vcpu_throttle(i, 0)
            self.quota.update(quotas)
            self.period_ms = period
            empty = not self.quota
        if empty:
            self.stop()
        else:
            self._ensure_running()
        log.info("dirty_limits_restored", vcpus=sorted(quotas))

    def query(self) -> list[DirtyLimitInfo]:
        with self._lock:
            return [DirtyLimitInfo(cpu_index=i, limit_rate=q, current_rate=self.current.get(i, 0))
                    for i, q in sorted(self.quota.items())]

    def threads(self) -> list[threading.Thread]:
        """The controller thread, while there is one."""
        return [self._thread] if self._thread is not None else []

    # -- the controller ---------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._consumer = self.machine.tracker().consumer("dirty-limit")
            self._consumer.collect()
            self._thread = threading.Thread(target=self._loop, name="dirtyrate-stat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        for i in list(self.machine.vcpus.vcpu_throttle):
            self.machine.vcpus.set_vcpu_throttle(i, 0)

    def _loop(self) -> None:
        t_last = time.monotonic()
        while not self._stop.wait(self.period_ms / 1000):
            t = time.monotonic()
            report = self._consumer.collect()  # type: ignore[union-attr]
            elapsed = t - t_last
            t_last = t
            page = self.machine.blocks[0].page_size
            counts = report.vcpu_pages or {}
            rates = {v.index: counts.get(v.index, 0) * page / _MB / elapsed for v in self.machine.vcpus.vcpus}
            with self._lock:
                self.current = {i: int(r) for i, r in rates.items()}  # query-vcpu-dirty-limit's whole MB/s
                for i, quota in self.quota.items():
                    self._adjust(i, quota, rates.get(i, 0.0))  # the exact rate: 5.9 is not within 1 of 4

    def _adjust(self, index: int, quota: int, current: float) -> None:
        """Step the vCPU's sleep share toward its quota.

        A vCPU's dirty rate scales with the share of time it runs, so the share that meets the quota
        is (1 - p_new) = (1 - p_old) × quota / current. Like QEMU, nothing changes within a tolerance
        (a tenth of the quota) and a measured rate of 0 changes nothing.
        """
        vc = self.machine.vcpus
        pct = vc.vcpu_throttle.get(index, 0)
        if current == 0 or abs(current - quota) <= max(1, quota // 10):
            return
        run_share = (100 - pct) * quota / current
        new = max(0, min(99, round(100 - run_share)))
        if new != pct:
            vc.set_vcpu_throttle(index, new)
            log.debug("dirty_limit_step", vcpu=index, quota=quota, current=current, throttle=new)

    # -- query-migrate members ------------------------------------------------------------

    def throttle_time_per_round_us(self) -> int:
        """The longest sleep a limited vCPU really took in its latest throttle round, in µs (measured)."""
        with self._lock:
            limited = set(self.quota)
        slept = [v.last_throttle_sleep for v in self.machine.vcpus.vcpus
                 if v.index in limited and self.machine.vcpus.vcpu_throttle.get(v.index, 0)]
        return int(max(slept, default=0.0) * 1e6)

    def ring_full_time_us(self) -> int:
        """µs for a vCPU at the average dirty rate of running vCPUs to dirty RING_PAGES pages (0 if idle)."""
        rates = [r for r in self.current.values() if r > 0]
        if not rates:
            return 0
        avg = sum(rates) / len(rates)
        page = self.machine.blocks[0].page_size
        return int(RING_PAGES * page / (avg * _MB) * 1e6)
