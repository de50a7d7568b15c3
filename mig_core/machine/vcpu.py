"""vCPU threads: the host's worker threads, which mig can stop, throttle and resume at safe points.

A host thread becomes a vCPU by ``register()``ing and then calls
``safe_point()`` now and then (cheap: one attribute test when nothing is
asked). ``stop_all()`` returns once every vCPU has parked at a safe point and
reports how long that took; ``set_throttle(pct)`` makes each vCPU sleep that
share of every period, QEMU's way (sleep pct/(1-pct) × the run slice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mig_core.errors import VcpuStopTimeout

log = structlog.get_logger("mig.vcpu")

_local = threading.local()

#: QEMU's CPU_THROTTLE_TIMESLICE_NS: the run slice the sleep is proportional to.
THROTTLE_TIMESLICE = 0.010


def current_vcpu() -> int | None:
    """The index of the vCPU the calling thread is, or None."""
    return getattr(_local, "vcpu", None)


@dataclass
class Vcpu:
    """One registered vCPU thread."""

    index: int
    controller: VcpuController
    thread_id: int
    name: str
    parked: bool = False
    safe_points: int = 0
    #: seconds this vCPU really slept for throttling (measured, not planned)
    throttled_seconds: float = 0.0
    #: the sleep of its latest throttle round, measured (a stop or the end of throttling cuts it short)
    last_throttle_sleep: float = 0.0
    #: throttle rounds slept so far
    throttle_rounds: int = 0

    def safe_point(self) -> None:
        """Park here while the machine is stopped; sleep here while throttled."""
        self.safe_points += 1
        c = self.controller
        if c._stop_requested:
            c._park(self)
        pct = max(c.throttle_pct, c.vcpu_throttle.get(self.index, 0))
        if pct:
            now = time.monotonic()
            if now >= c._throttle_due.get(self.index, 0.0):
                share = pct / 100.0
                sleep = share / (1.0 - share) * THROTTLE_TIMESLICE
                c._throttle_due[self.index] = now + sleep + THROTTLE_TIMESLICE
                # wake early if the machine is stopped or throttling ends
                c._wake.wait(sleep)
                slept = time.monotonic() - now
                self.throttled_seconds += slept
                self.last_throttle_sleep = slept
                self.throttle_rounds += 1

    def idle(self, seconds: float) -> None:
        """Sleep, but return at once when the machine is asked to stop (keeps stop latency low)."""
        self.controller._wake.wait(seconds)

    def unregister(self) -> None:
        self.controller._unregister(self)


class VcpuController:
    """Stops, throttles and resumes the registered vCPU threads."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._vcpus: dict[int, Vcpu] = {}
        self._next = 0
        self._stop_requested = False
        self._wake = threading.Event()
        self._throttle_due: dict[int, float] = {}
        self.throttle_pct = 0
        #: Per-vCPU throttle (dirty-limit), applied on top of the global one (the larger wins).
        self.vcpu_throttle: dict[int, int] = {}
        #: Seconds the most recent stop_all() took until every vCPU was parked.
        self.last_stop_latency = 0.0

    @property
    def vcpus(self) -> list[Vcpu]:
        with self._lock:
            return list(self._vcpus.values())

    def register(self, name: str | None = None) -> Vcpu:
        """Make the calling thread a vCPU; it must call ``safe_point()`` regularly from now on."""
        with self._lock:
            index = self._next
            self._next += 1
            v = Vcpu(index, self, threading.get_native_id(), name or f"CPU {index}/TCG")
            self._vcpus[index] = v
        _local.vcpu = index
        log.info("vcpu_registered", vcpu=index, thread_id=v.thread_id)
        if self._stop_requested:
            v.safe_point()  # joining a stopped machine: wait for the resume
        return v

    def _unregister(self, v: Vcpu) -> None:
        with self._lock:
            self._vcpus.pop(v.index, None)
            self._lock.notify_all()
        if current_vcpu() == v.index:
            _local.vcpu = None

    def _park(self, v: Vcpu) -> None:
        with self._lock:
            v.parked = True
            self._lock.notify_all()
            while self._stop_requested:
                self._lock.wait()
            v.parked = False

    def stop_all(self, timeout: float = 5.0) -> float:
        """Ask every vCPU to park and wait until all have; returns the stop latency in seconds."""
        t0 = time.monotonic()
        with self._lock:
            self._stop_requested = True
            self._wake.set()
            ok = self._lock.wait_for(lambda: all(v.parked for v in self._vcpus.values()), timeout)
            if not ok:
                late = [v.name for v in self._vcpus.values() if not v.parked]
                self._stop_requested = False
                self._wake.clear()
                self._lock.notify_all()
                raise VcpuStopTimeout(f"vCPUs did not reach a safe point within {timeout:g} s: {', '.join(late)}")
        self.last_stop_latency = time.monotonic() - t0
        log.info("vcpus_stopped", vcpus=len(self._vcpus), latency_ms=round(self.last_stop_latency * 1000, 3))
        return self.last_stop_latency

    def hold(self) -> None:
        """Ask vCPUs to park at their next safe point without waiting for them."""
        with self._lock:
            self._stop_requested = True
            self._wake.set()

    def resume_all(self) -> None:
        with self._lock:
            self._stop_requested = False
            self._wake.clear()
            self._lock.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stop_requested

    def set_throttle(self, pct: int) -> None:
        """Make every vCPU sleep ``pct`` % of its time (0 ends throttling at once)."""
        if not 0 <= pct < 100:
            raise ValueError(f"throttle percentage {pct} must be in 0..99")
        self.throttle_pct = pct
        if pct == 0:
            self._wake.set()
            self._throttle_due.clear()
            if not self._stop_requested:
                self._wake.clear()

    def set_vcpu_throttle(self, index: int, pct: int) -> None:
        """Throttle one vCPU (dirty-limit); 0 removes its own throttle."""
        if not 0 <= pct < 100:
            raise ValueError(f"throttle percentage {pct} must be in 0..99")
        if pct:
            self.vcpu_throttle[index] = pct
        else:
            self.vcpu_throttle.pop(index, None)

    def run(self, target: Callable[[Vcpu], None], count: int, name: str = "vcpu") -> list[threading.Thread]:
        """Start ``count`` daemon threads, each registered as a vCPU, running ``target(vcpu)``."""
        threads = []
        for i in range(count):
            def body() -> None:
                v = self.register()
                try:
                    target(v)
                finally:
                    v.unregister()
            t = threading.Thread(target=body, name=f"{name}-{i}", daemon=True)
            t.start()
            threads.append(t)
        return threads
