"""Migration statistics, measured as QEMU measures them (query-migrate's MigrationStats)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from mig_core.schema.migration import CompressionStats, MigrationStats, VfioStats, XBZRLECacheStats

#: QEMU's BUFFER_DELAY: the window over which throughput and bandwidth are measured.
WINDOW_S = 0.1


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True)
class PassRecord:
    """One precopy pass as the source lived it: what it sent of RAM and of device state, and how long."""

    number: int
    bytes: int
    device_bytes: int
    device_iterate_ms: float
    ms: float
    #: switchover-ack: how long the source waited for the destination's ack after this pass converged
    switchover_ack_wait_ms: float = 0.0


@dataclass
class SourceStats:
    """What query-migrate shows of an outgoing migration, read from the engine in one call."""

    setup_time: int
    total_time: int
    ram: MigrationStats
    downtime: int | None = None
    expected_downtime: int | None = None
    xbzrle_cache: XBZRLECacheStats | None = None
    compression: CompressionStats | None = None
    #: None while the vCPUs are not throttled (query-migrate then omits it)
    cpu_throttle_percentage: int | None = None
    dirty_limit_throttle_time_per_round: int | None = None
    dirty_limit_ring_full_time: int | None = None
    #: bytes sent by devices marked ``vfio`` (None when no such device is registered)
    vfio: VfioStats | None = None
    #: every pass so far (mig's own: not in query-migrate, for embedders and tests)
    passes: list[PassRecord] = field(default_factory=list)


@dataclass
class MigrationCounters:
    """Counters of one outgoing migration; the migration thread updates, query-migrate reads."""

    page_size: int = 4096
    total: int = 0
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    postcopy_requests: int = 0
    #: set at the switch to postcopy: what the stopped source sends from then on counts as postcopy-bytes
    in_postcopy: bool = False
    multifd_bytes: int = 0
    missed_zero_copy: int = 0
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    pages_per_second: int = 0
    #: bytes per millisecond measured over the last window (0 until the first window)
    bandwidth: float = 0.0
    expected_downtime: int = 0
    start_ms: int = 0
    setup_ms: int | None = None
    end_ms: int | None = None
    downtime_start_ms: int | None = None
    downtime_ms: int | None = None
    passes: list[PassRecord] = field(default_factory=list)
    _window_start: float = 0.0
    _window_bytes: int = 0
    _window_pages: int = 0
    _rate_start: float = 0.0
    _rate_pages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self.start_ms = now_ms()
        self._window_start = self._rate_start = time.monotonic()

    def sent(self, nbytes: int, pages: int, running: bool) -> None:
        """Bytes written to the channel (and how many pages they carried)."""
        with self._lock:
            self.transferred += nbytes
            if running:
                self.precopy_bytes += nbytes
            elif self.in_postcopy:
                self.postcopy_bytes += nbytes
            else:
                self.downtime_bytes += nbytes
            self._window_bytes += nbytes
            self._window_pages += pages
        self.tick()

    def multifd_sent(self, nbytes: int, normal: int, zero: int) -> None:
        """A multifd channel wrote a packet (QEMU counts these in transferred and multifd-bytes only)."""
        with self._lock:
            self.transferred += nbytes
            self.multifd_bytes += nbytes
            self.normal += normal
            self.duplicate += zero
            self._window_bytes += nbytes
            self._window_pages += normal
        self.tick()

    def zero_copy_missed(self) -> None:
        """A sync found that the kernel copied some zero-copy sends (dirty-sync-missed-zero-copy)."""
        with self._lock:
            self.missed_zero_copy += 1

    def tick(self) -> None:
        """Close the measurement window when 100 ms have passed (QEMU's counters update)."""
        t = time.monotonic()
        elapsed = t - self._window_start
        if elapsed < WINDOW_S:
            return
        with self._lock:
            self.bandwidth = self._window_bytes / (elapsed * 1000)
            self.mbps = self._window_bytes * 8 / elapsed / 1e6
            self.pages_per_second = int(self._window_pages / elapsed)
            self._window_start, self._window_bytes, self._window_pages = t, 0, 0

    def synced(self, dirty_pages: int) -> None:
        """A dirty-bitmap sync found ``dirty_pages`` (updates dirty-pages-rate once a second)."""
        t = time.monotonic()
        with self._lock:
            self.dirty_sync_count += 1
            self.remaining = dirty_pages * self.page_size
            if self.bandwidth and not self.expected_downtime:
                # until a dirty pass was measured: dirty bytes at this sync / the window bandwidth (QEMU's way)
                self.expected_downtime = int(self.remaining / self.bandwidth)
            if self.dirty_sync_count == 1:
                # the first sync reports everything populated, not what was dirtied: the rate starts here
                self._rate_start = t
                return
            self._rate_pages += dirty_pages
            if t - self._rate_start >= 1.0:
                self.dirty_pages_rate = int(self._rate_pages / (t - self._rate_start))
                self._rate_start, self._rate_pages = t, 0

    def total_time(self) -> int:
        return (self.end_ms if self.end_ms is not None else now_ms()) - self.start_ms

    def finish(self) -> None:
        """Freeze the clocks; mbps becomes the average over the whole migration, as QEMU reports it."""
        self.end_ms = now_ms()
        if self.downtime_start_ms is not None and self.downtime_ms is None:  # postcopy measured it already
            self.downtime_ms = self.end_ms - self.downtime_start_ms
        busy = self.total_time() - (self.setup_ms or 0)
        if busy > 0:
            self.mbps = self.transferred * 8 / busy / 1000
        self.remaining = 0
        self.dirty_pages_rate = 0

    def to_stats(self) -> MigrationStats:
        with self._lock:
            return MigrationStats(
                transferred=self.transferred, remaining=self.remaining, total=self.total,
                duplicate=self.duplicate, normal=self.normal, normal_bytes=self.normal * self.page_size,
                dirty_pages_rate=self.dirty_pages_rate, mbps=round(self.mbps, 4),
                dirty_sync_count=self.dirty_sync_count, postcopy_requests=self.postcopy_requests,
                page_size=self.page_size, multifd_bytes=self.multifd_bytes, pages_per_second=self.pages_per_second,
                precopy_bytes=self.precopy_bytes, downtime_bytes=self.downtime_bytes,
                postcopy_bytes=self.postcopy_bytes, dirty_sync_missed_zero_copy=self.missed_zero_copy,
            )


class RateLimiter:
    """QEMU's max-bandwidth: at most limit/10 bytes per 100 ms window; 0 (or < 10) means unlimited."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._window_start = time.monotonic()
        self._used = 0

    def set_limit(self, limit: int) -> None:
        self.limit = limit

    def wait_time(self, nbytes: int) -> float:
        """Account ``nbytes`` just sent; how long to sleep before sending more."""
        if self.limit < 10:
            return 0.0
        t = time.monotonic()
        if t - self._window_start >= WINDOW_S:
            self._window_start, self._used = t, 0
        self._used += nbytes
        budget = self.limit * WINDOW_S
        if self._used < budget:
            return 0.0
        # over budget: sleep out this window, and further windows for what exceeds it
        excess = self._used - budget
        delay = self._window_start + WINDOW_S - t + excess / self.limit
        self._window_start, self._used = t + delay, 0
        return max(0.0, delay)
