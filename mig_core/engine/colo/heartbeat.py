"""COLO's heartbeat watchdog: each side hears from its peer (any bytes at all count) and says when the
peer has been silent longer than ``x-colo-heartbeat-timeout``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("mig.colo")


def interval_s(timeout_ms: int) -> float:
    """How often a side sends its heartbeat: five per timeout, at most every 200 ms, at least every 10 ms."""
    return min(0.2, max(0.01, timeout_ms / 5000)) if timeout_ms else 0.2


class Watchdog:
    """A thread that calls ``beat`` every interval and ``lost(why)`` once the peer is silent too long.

    ``heard()`` is how many bytes came from the peer so far (any progress counts as a heartbeat);
    ``watching()`` says whether silence counts now (not while this side itself is busy loading a
    checkpoint, when the peer legitimately waits for it). A timeout of 0 watches nothing.
    """

    def __init__(self, name: str, timeout_ms: Callable[[], int], heard: Callable[[], int],
                 beat: Callable[[], None], lost: Callable[[str], object],
                 watching: Callable[[], bool] = lambda: True) -> None:
        self._timeout_ms = timeout_ms
        self._heard = heard
        self._beat = beat
        self._lost = lost
        self._watching = watching
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_bytes, last_change = self._heard(), time.monotonic()
        while not self._stop.is_set():
            timeout = self._timeout_ms()
            self._stop.wait(interval_s(timeout))
            if self._stop.is_set():
                return
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a broken connection shows as silence; the loop reports it
                log.debug("colo_heartbeat_not_sent", error=str(e))
            now, seen = time.monotonic(), self._heard()
            if seen != last_bytes or not self._watching():
                last_bytes, last_change = seen, now
                continue
            if timeout and (now - last_change) * 1000 > timeout:
                self._stop.set()
                self._lost(f"no heartbeat from the peer for {round((now - last_change) * 1000)} ms "
                           f"(x-colo-heartbeat-timeout {timeout} ms)")
                return
