"""QMP events: timestamped, handed to every subscriber (QMP sessions) and to the ``mig_event`` hook."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from mig_core.plugin.hooks import Hooks
from mig_core.qapi import to_qmp

log = structlog.get_logger("mig.events")

Subscriber = Callable[[dict[str, Any]], None]


def timestamp() -> tuple[int, int]:
    ns = time.time_ns()
    return ns // 1_000_000_000, (ns // 1000) % 1_000_000


def envelope(name: str, payload: dict[str, Any] | None = None,
             when: tuple[int, int] | None = None) -> dict[str, Any]:
    """A QMP event as clients receive it: timestamp, name and (if any) data."""
    secs, usecs = when or timestamp()
    msg: dict[str, Any] = {"timestamp": {"seconds": secs, "microseconds": usecs}, "event": name}
    if payload is not None:
        msg["data"] = payload
    return msg


class EventEmitter:
    """Builds QMP event envelopes and fans them out; safe to call from any thread."""

    def __init__(self, hooks: Hooks | None = None) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._hooks = hooks

    def subscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def emit(self, name: str, data: Any = None) -> None:
        when = timestamp()
        payload = None if data is None else to_qmp(data)
        msg = envelope(name, payload, when)
        log.debug("qmp_event", name=name, data=payload)
        with self._lock:
            subs = list(self._subscribers)
        for fn in subs:
            fn(msg)
        if self._hooks is not None:
            self._hooks.event(name, payload, when)
