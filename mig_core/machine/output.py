"""The machine's outbound messages (a NIC's packets, a service's replies): what the program emits and
where it goes.

Outside replication every message is released at once to the host's sink. Under COLO the replication
engine diverts them: the primary holds each until the secondary produced the same, the secondary
forwards its own to the primary for comparison and releases nothing until it takes over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import structlog

log = structlog.get_logger("mig.output")

Sink = Callable[[bytes], None]


class OutputPort:
    """Where the program hands its outbound messages (``emit``) and the host takes released ones (``sink``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sink: Sink | None = None
        self._divert: Sink | None = None
        #: messages released to the sink since the machine was made
        self.released = 0

    def set_sink(self, sink: Sink | None) -> None:
        """The host's side: where released messages go (None: they are dropped, as by an unplugged link)."""
        with self._lock:
            self._sink = sink

    def emit(self, packet: bytes) -> None:
        """The program sends ``packet``: released now, or handed to replication while it diverts output."""
        with self._lock:
            divert = self._divert
            if divert is None:
                self._release_locked(packet)
                return
        divert(packet)

    def release(self, packets: Iterable[bytes]) -> None:
        """Replication lets ``packets`` out, in order."""
        with self._lock:
            for p in packets:
                self._release_locked(p)

    def _release_locked(self, packet: bytes) -> None:
        self.released += 1
        if self._sink is not None:
            try:
                self._sink(packet)
            except OSError as e:  # the host's sink failing must not stop the program
                log.error("output_sink_failed", error=str(e))

    def divert(self, to: Sink | None) -> None:
        """Replication takes every emitted message (None: back to releasing them at once)."""
        with self._lock:
            self._divert = to
