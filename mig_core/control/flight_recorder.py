"""The flight recorder: every migration's life, pass by pass and second by second, on both sides.

A hook plugin the manager registers like any other (status changes and passes come through pluggy). For
the current or last migration of each side it keeps records in a bounded ring — ``x-query-migration-record``
returns them — and, where the host asks (``mig run --flight-dir DIR``, ``FlightRecorder.directory``),
writes each as one JSON line to ``DIR/<migration id>-<side>.jsonl``. A record is one of

* ``status``: the status changed (the error, once there is one);
* ``pass``: a dirty sync ended a pass (source): its number, the dirty bytes found, and the figures below;
* ``second``: once a second while the migration runs, the figures below;
* ``end``: the migration ended (completed, failed, cancelled): the final figures.

The figures are query-migrate's as the side reports them: status, total-time, expected-downtime, downtime,
setup-time, transferred, remaining, total, dirty-sync-count, dirty-pages-rate, mbps, pages, throttle and
dirty-limit state, error. Every record has ``t`` (seconds since the epoch) and ``ms`` (since the start).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import structlog

from mig_core.plugin.hookspecs import hookimpl
from mig_core.schema.common import Side
from mig_core.schema.migration import MigrationStatus as S

log = structlog.get_logger("mig.flight_recorder")

#: Records kept per side (about a day of per-second records, or thousands of passes).
CAPACITY = 100_000
#: Seconds between two ``second`` records.
INTERVAL_S = 1.0
_ENDED = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})
_RAM = ("transferred", "remaining", "total", "dirty-sync-count", "dirty-pages-rate", "mbps", "normal",
        "duplicate", "pages-per-second", "postcopy-requests")
_TOP = ("status", "total-time", "setup-time", "expected-downtime", "downtime", "cpu-throttle-percentage",
        "dirty-limit-throttle-time-per-round", "dirty-limit-ring-full-time", "error-desc")


def figures(info: dict[str, Any]) -> dict[str, Any]:
    """The recorded subset of a query-migrate reply (flattened: ram's members at the top)."""
    out = {k: info[k] for k in _TOP if k in info}
    ram = info.get("ram") or {}
    out.update({k: ram[k] for k in _RAM if k in ram})
    return out


class _Flight:
    """The records of one migration on one side."""

    def __init__(self, migration_id: str, side: Side, directory: Path | None) -> None:
        self.migration_id, self.side = migration_id, side
        self.start = time.monotonic()
        self.ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=CAPACITY)
        self.lock = threading.Lock()
        self.file: IO[str] | None = None
        self.ended = threading.Event()
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.file = open(directory / f"{migration_id}-{side.value}.jsonl", "a", buffering=1)
            except OSError as e:  # the recording is lost, the migration is not
                log.warning("flight_record_file_failed", directory=str(directory), error=e.strerror)

    def add(self, kind: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        rec = {"kind": kind, "t": round(time.time(), 6), "ms": round((now - self.start) * 1000, 3), **fields}
        with self.lock:
            self.ring.append(rec)
            if self.file is not None:
                try:
                    self.file.write(json.dumps(rec) + "\n")
                except (OSError, ValueError) as e:
                    log.warning("flight_record_write_failed", error=str(e))
                    self.file = None

    def close(self) -> None:
        self.ended.set()
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


class FlightRecorder:
    """Hook implementations that record each side's migration; ``sample(side)`` is that side's query-migrate."""

    def __init__(self, sample: Callable[[Side], dict[str, Any]], directory: Path | None = None,
                 interval: float = INTERVAL_S) -> None:
        self.sample = sample
        #: where JSON lines go (None: the ring only); takes effect from the next migration
        self.directory = directory
        self.interval = interval
        #: False: record nothing (``mig run --no-flight-record``; the recorder's cost is measured against it)
        self.enabled = True
        self._flights: dict[Side, _Flight] = {}
        self._lock = threading.Lock()

    def records(self, side: Side | None = None) -> list[dict[str, Any]]:
        """The current or last migration's records (of ``side``; else of the side that started last)."""
        with self._lock:
            flights = [f for s, f in self._flights.items() if side is None or s is side]
        if not flights:
            return []
        flight = max(flights, key=lambda f: f.start)
        with flight.lock:
            return list(flight.ring)

    def _figures(self, side: Side) -> dict[str, Any]:
        try:
            return figures(self.sample(side))
        except Exception as e:  # noqa: BLE001 - recording never breaks the migration it records
            log.warning("flight_record_sample_failed", error=f"{type(e).__name__}: {e}")
            return {}

    def _tick(self, flight: _Flight) -> None:
        while not flight.ended.wait(self.interval):
            flight.add("second", self._figures(flight.side))

    @hookimpl
    def mig_status_changed(self, side: Side, old: S, new: S, migration_id: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            flight = self._flights.get(side)
            if flight is None or flight.migration_id != migration_id:
                if flight is not None:
                    flight.close()
                flight = self._flights[side] = _Flight(migration_id, side, self.directory)
                threading.Thread(target=self._tick, args=(flight,), name=f"mig/recorder/{side.value}",
                                 daemon=True).start()
        flight.add("status", {"status": new.value, "from": old.value})
        if new in _ENDED:
            flight.add("end", self._figures(side))
            flight.close()

    @hookimpl
    def mig_pass_completed(self, migration_id: str, pass_number: int, dirty_bytes: int) -> None:
        if not self.enabled:
            return
        flight = self._flights.get(Side.SOURCE)
        if flight is not None and flight.migration_id == migration_id:
            flight.add("pass", {"pass": pass_number, "dirty-bytes": dirty_bytes, **self._figures(Side.SOURCE)})
