"""Packet-by-packet comparison of the primary's and the secondary's output (QEMU's colo-compare).

The primary holds each message its program emits; the secondary's messages
arrive in the order its program emitted them. The n-th of one side is compared
with the n-th of the other: equal, the primary's is released; different, the
sides have diverged, everything from there is held and a checkpoint is asked
for at once. A checkpoint makes the secondary the primary's copy, so what the
primary held when the checkpoint began is released once the secondary loaded
it; what the primary emits after it resumed (it may resume as soon as the
secondary holds the whole checkpoint) waits for the secondary's output from
that checkpoint on. The queue is bounded:
reaching ``queue_limit`` held messages (a secondary far behind) asks for a
checkpoint too.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable

import structlog

from mig_core.ext.replication import CompareStats, Replication, Role

log = structlog.get_logger("mig.colo.compare")


class ColoCompare(Replication):
    """One side's comparison; on the secondary the engine forwards output and nothing is compared here."""

    name = "colo"

    def __init__(self, role: Role, release: Callable[[Iterable[bytes]], None],
                 request_checkpoint: Callable[[str], None], queue_limit: int) -> None:
        super().__init__(role, release, request_checkpoint, queue_limit)
        self._lock = threading.Lock()
        self._mine: deque[bytes] = deque()  # held, in order
        self._theirs: deque[bytes] = deque()  # the secondary's, not yet matched
        self._diverged = False
        self._in_checkpoint = False
        self._frozen = 0  # how many of the held messages the checkpoint in progress carries
        self._alone = False  # after a failover: no comparison, every message goes out at once
        self._stats = CompareStats()

    def output(self, packet: bytes) -> None:
        with self._lock:
            if self._alone:
                self._stats.released_unmatched += 1
                self.release([packet])
                return
            self._mine.append(packet)
            if not self._in_checkpoint:
                self._match()
            self._note_depth()

    def peer_output(self, packet: bytes) -> None:
        with self._lock:
            if self._alone:
                return
            self._theirs.append(packet)
            if not self._in_checkpoint:
                self._match()
            if len(self._theirs) > self.queue_limit:  # the secondary runs far ahead: resynchronise
                self._ask("queue-full")

    def _match(self) -> None:
        """Release the primary's messages the secondary matched, in order; stop at the first difference."""
        while self._mine and self._theirs and not self._diverged:
            if self._mine[0] != self._theirs[0]:
                self._diverged = True
                self._stats.mismatches += 1
                log.debug("colo_mismatch", held=len(self._mine))
                self._ask("mismatch")
                return
            self._theirs.popleft()
            self._stats.matched += 1
            self.release([self._mine.popleft()])

    def _note_depth(self) -> None:
        depth = len(self._mine)
        self._stats.max_queue_depth = max(self._stats.max_queue_depth, depth)
        if depth >= self.queue_limit:
            self._ask("queue-full")

    def _ask(self, reason: str) -> None:
        if reason == "queue-full":
            self._stats.queue_full += 1
        self.request_checkpoint(reason)

    def held(self) -> list[bytes]:
        with self._lock:
            return list(self._mine)

    def checkpoint_started(self) -> None:
        """Both sides stopped: what the secondary sent before no longer counts (its state is replaced)."""
        with self._lock:
            self._in_checkpoint = True
            self._frozen = len(self._mine)
            self._theirs.clear()

    def checkpoint_done(self) -> None:
        with self._lock:
            carried = [self._mine.popleft() for _ in range(min(self._frozen, len(self._mine)))]
            if carried:
                self._stats.released_unmatched += len(carried)
                self.release(carried)
            self._frozen = 0
            self._diverged = False
            self._in_checkpoint = False
            self._match()  # both sides' output since the checkpoint, compared from its start

    def failover(self) -> None:
        with self._lock:
            if self._mine:
                self._stats.released_unmatched += len(self._mine)
                self.release(list(self._mine))
                self._mine.clear()
            self._theirs.clear()
            self._alone = True

    def stats(self) -> CompareStats:
        with self._lock:
            s = self._stats
            return CompareStats(queue_depth=len(self._mine), max_queue_depth=s.max_queue_depth, matched=s.matched,
                                released_unmatched=s.released_unmatched, mismatches=s.mismatches,
                                queue_full=s.queue_full)
