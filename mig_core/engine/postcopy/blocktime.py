"""postcopy-blocktime: how long the destination's vCPUs waited for pages (QEMU's definitions).

Each fault is recorded with the faulting thread's id (userfaultfd's THREAD_ID
feature) and the time it was read. When its page is placed, the wait is over:
a vCPU's blocktime grows by that wait, and the overlapped total grows by the
time during which every vCPU was waiting at once. Faults of other threads
(the host's own, not vCPUs) count in neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


class BlocktimeMeter:
    """Per-vCPU and all-vCPU blocked time, fed by the page server's fault and placement paths."""

    def __init__(self, vcpu_tids: Sequence[int]) -> None:
        self.index = {tid: i for i, tid in enumerate(vcpu_tids)}
        self.vcpu_ns = [0] * len(vcpu_tids)
        self.total_ns = 0
        self.faults = 0
        self._since: dict[int, int] = {}  # vCPU index -> when it started waiting
        self._waiting: dict[tuple[str, int], list[int]] = {}  # page -> vCPUs waiting on it
        self._all_since: int | None = None

    def fault(self, block: str, page: int, tid: int) -> bool:
        """A fault of thread ``tid`` on ``page``; True if it is a vCPU's (then ``placed`` must follow)."""
        i = self.index.get(tid)
        if i is None or i in self._since:
            return False
        now = time.monotonic_ns()
        self.faults += 1
        self._since[i] = now
        self._waiting.setdefault((block, page), []).append(i)
        if len(self._since) == len(self.index) and self._all_since is None:
            self._all_since = now
        return True

    def placed(self, block: str, page: int) -> None:
        """The page arrived: every vCPU waiting on it runs again."""
        vcpus = self._waiting.pop((block, page), None)
        if not vcpus:
            return
        now = time.monotonic_ns()
        if self._all_since is not None:
            self.total_ns += now - self._all_since
            self._all_since = None
        for i in vcpus:
            self.vcpu_ns[i] += now - self._since.pop(i)

    def report(self) -> dict[str, object]:
        """Milliseconds, as query-migrate shows them."""
        return {"blocktime_ms": self.total_ns // 1_000_000, "vcpu_blocktime_ms": [n // 1_000_000 for n in self.vcpu_ns]}
