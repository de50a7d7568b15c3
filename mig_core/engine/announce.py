"""Self-announce on the destination after switchover: the ``mig_announce`` hook on QEMU's schedule.

Round 1 after ``announce-initial`` ms, then each delay grows by
``announce-step`` ms up to ``announce-max`` ms, ``announce-rounds`` rounds in
all (0: none). Host software implements the hook to tell its peers where it
now lives; the built-in implementation logs.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from mig_core.plugin.hooks import Hooks

log = structlog.get_logger("mig.announce")


def schedule(params: dict[str, Any]) -> list[int]:
    """Delays in ms before each round, from the previous round (the first from switchover)."""
    return [min(params["announce-initial"] + k * params["announce-step"], params["announce-max"])
            for k in range(params["announce-rounds"])]


def start_announce(hooks: Hooks, params: dict[str, Any]) -> threading.Thread | None:
    delays = schedule(params)
    if not delays:
        return None
    stop = threading.Event()

    def run() -> None:
        for i, delay in enumerate(delays, 1):
            if stop.wait(delay / 1000):
                return
            hooks.announce(i, len(delays))

    t = threading.Thread(target=run, name="mig/dst/announce", daemon=True)
    t.stop = stop  # type: ignore[attr-defined]
    t.start()
    return t
