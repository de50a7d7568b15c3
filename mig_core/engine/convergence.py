"""Making a busy program's migration converge: auto-converge and dirty-limit, on QEMU's trigger.

At each dirty sync, once a period of at least a second has passed: if the bytes
dirtied in the period exceed ``throttle-trigger-threshold`` % of the bytes sent
in it, a counter goes up, and every second time (QEMU's rule, not two in a
row) throttling steps: auto-converge raises the vCPU sleep share
(``cpu-throttle-initial``, then ``cpu-throttle-increment`` — or less with
``cpu-throttle-tailslow`` — up to ``max-cpu-throttle``); dirty-limit holds each
vCPU to ``vcpu-dirty-limit`` MB/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from mig_core.engine.dirtylimit import DirtyLimiter
from mig_core.machine.vcpu import VcpuController

log = structlog.get_logger("mig.convergence")

PERIOD_S = 1.0


class ConvergenceTrigger:
    """QEMU's period accounting and step rule; ``mode`` is ``auto-converge``, ``dirty-limit`` or None."""

    def __init__(self, mode: str | None, params: Callable[[], Mapping[str, Any]], vcpus: VcpuController,
                 limiter: DirtyLimiter | None) -> None:
        self.mode = mode
        self.params = params
        self.vcpus = vcpus
        self.limiter = limiter
        self.steps: list[int] = []  # throttle percentages applied, in order (auto-converge)
        self.dirty_limit_applied: int | None = None
        #: the limiter's quotas and period from before the migration first applied its own
        self._operator_limits: tuple[dict[int, int], int] | None = None
        self._period_start = 0.0
        self._xfer_start = 0
        self._dirty_pages = 0
        self._over = 0
        self._tightened = False  # the autopilot halved the dirty limit: the parameter no longer sets it

    def start(self, transferred: int) -> None:
        self._period_start = time.monotonic()
        self._xfer_start = transferred

    def on_sync(self, dirty_pages: int, transferred: int, page_size: int) -> None:
        if self.mode is None:
            return
        self._dirty_pages += dirty_pages
        now = time.monotonic()
        if now - self._period_start < PERIOD_S:
            return
        xfer = transferred - self._xfer_start
        dirty = self._dirty_pages * page_size
        threshold = xfer * self.params()["throttle-trigger-threshold"] / 100
        log.debug("convergence_period", dirty=dirty, threshold=threshold, over=self._over)
        if dirty > threshold:
            self._over += 1
            if self._over >= 2:
                self._over = 0
                self._step(dirty, threshold)
        self._period_start, self._xfer_start, self._dirty_pages = now, transferred, 0

    def engage(self, mode: str) -> str:
        """Step now in ``mode`` (``auto-converge`` or ``dirty-limit``), whatever the trigger says: the autopilot's
        lever. A dirty limit already applied is halved (down to 1 MB/s); returns what was applied."""
        if mode == "dirty-limit" and self.limiter is None:
            raise ValueError("dirty-limit needs a limiter (per-vCPU dirty attribution)")
        self.mode = mode
        if mode == "dirty-limit" and self.dirty_limit_applied is not None:
            self._tightened = True
            self._apply_dirty_limit(max(1, self.dirty_limit_applied // 2))
            return f"dirty-limit {self.dirty_limit_applied} MB/s"
        self._step(0.0, 0.0)
        return (f"dirty-limit {self.dirty_limit_applied} MB/s" if mode == "dirty-limit"
                else f"cpu-throttle {self.vcpus.throttle_pct} %")

    def _apply_dirty_limit(self, rate: int) -> None:
        assert self.limiter is not None
        if self._operator_limits is None:
            self._operator_limits = self.limiter.limits()  # put back when the migration ends
        self.limiter.period_ms = self.params()["x-vcpu-dirty-limit-period"]
        if rate != self.dirty_limit_applied:
            self.limiter.set_limit(None, rate)
            self.dirty_limit_applied = rate
            log.info("dirty_limit_applied", mb_per_s=rate)

    def _step(self, dirty: float, threshold: float) -> None:
        p = self.params()
        if self.mode == "dirty-limit":
            assert self.limiter is not None
            if not self._tightened:  # vcpu-dirty-limit as it is now, unless the autopilot went below it
                self._apply_dirty_limit(p["vcpu-dirty-limit"])
            return
        pct = self.vcpus.throttle_pct
        if not pct:
            new = p["cpu-throttle-initial"]
        else:
            inc = p["cpu-throttle-increment"]
            if p["cpu-throttle-tailslow"] and dirty > 0:
                cpu_now = 100 - pct
                cpu_ideal = cpu_now * threshold / dirty
                inc = max(0, min(inc, int(cpu_now - cpu_ideal)))
            new = pct + inc
        new = max(1, min(new, p["max-cpu-throttle"], 99))
        self.vcpus.set_throttle(new)
        self.steps.append(new)
        log.info("throttle_step", percentage=new)

    def stop(self) -> None:
        """However the migration ended: full speed again."""
        if self.mode == "auto-converge":
            self.vcpus.set_throttle(0)
        if self._operator_limits is not None and self.limiter is not None:
            # the limits the migration applied go; those an operator had set before come back
            self.limiter.restore(self._operator_limits)
            self._operator_limits = None
            self.dirty_limit_applied = None
            self._tightened = False
