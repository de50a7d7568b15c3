"""The flight recorder: every migration's life, pass by pass and second by second, on both sides.

A hook plugin the manager registers like any other (status changes and passes come through pluggy). For
the current or last migration of each side it keeps records in a bounded ring — ``x-query-migration-record``
returns them — and, where the host asks (``mig run --flight-dir DIR``, ``FlightRecorder.directory``),
writes each as one JSON line to ``DIR/<migration id>-<side>.jsonl``. A record is one of

* ``start``: once, before the first status: the ``side`` and the migration's settings: ``downtime-limit``,
  ``max-bandwidth``, ``avail-switchover-bandwidth``, the ``capabilities`` that are on, and the ``advice``
  of x-query-migration-advice when one was given in the last ten minutes;
* ``status``: the status changed (the error, once there is one);
* ``pass``: a dirty sync ended a pass (source): its number, the dirty bytes found, and the figures below;
* ``switchover``: the machine stopped for the switchover (the figures below say why it was time);
* ``second``: once a second while the migration runs, the figures below;
* ``end``: the migration ended (completed, failed, cancelled): the final figures;
* ``verdict`` (source, after ``end``, when ``start`` holds an ``advice``): the strategy used, the advice's
  prediction for it beside the outcome, and the error in percent.

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
                 interval: float = INTERVAL_S, settings: Callable[[], dict[str, Any]] | None = None,
                 verdict: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any] | None] | None = None
                 ) -> None:
        self.sample = sample
        #: ``(records, end figures)`` → a ``verdict`` record (the advice the migration started with, judged)
        self.verdict = verdict
        #: what a ``start`` record holds (the migration's parameters and capabilities)
        self.settings = settings
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

    def _settings(self) -> dict[str, Any]:
        if self.settings is None:
            return {}
        try:
            return self.settings()
        except Exception as e:  # noqa: BLE001 - recording never breaks the migration it records
            log.warning("flight_record_settings_failed", error=f"{type(e).__name__}: {e}")
            return {}

    def add(self, side: Side, migration_id: str, kind: str, fields: dict[str, Any]) -> bool:
        """Add a record of ``kind`` to ``side``'s current flight if it is ``migration_id``'s (False: it is not)."""
        flight = self._flights.get(side)
        if not self.enabled or flight is None or flight.migration_id != migration_id:
            return False
        flight.add(kind, fields)
        return True

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
                flight.add("start", {"side": side.value, **self._settings()})
                threading.Thread(target=self._tick, args=(flight,), name=f"mig/recorder/{side.value}",
                                 daemon=True).start()
        flight.add("status", {"status": new.value, "from": old.value})
        if new in _ENDED:
            end = self._figures(side)
            flight.add("end", end)
            if self.verdict is not None and side is Side.SOURCE:
                try:
                    with flight.lock:
                        records = list(flight.ring)
                    judged = self.verdict(records, end)
                    if judged is not None:
                        flight.add("verdict", judged)
                except Exception as e:  # noqa: BLE001 - recording never breaks the migration it records
                    log.warning("flight_record_verdict_failed", error=f"{type(e).__name__}: {e}")
            flight.close()

    @hookimpl
    def mig_pass_completed(self, migration_id: str, pass_number: int, dirty_bytes: int) -> None:
        if self.enabled and self._current(Side.SOURCE, migration_id):
            self.add(Side.SOURCE, migration_id, "pass",
                     {"pass": pass_number, "dirty-bytes": dirty_bytes, **self._figures(Side.SOURCE)})

    @hookimpl
    def mig_switchover(self, migration_id: str, side: Side) -> None:
        if self.enabled and side is Side.SOURCE and self._current(side, migration_id):
            self.add(side, migration_id, "switchover", self._figures(side))

    def _current(self, side: Side, migration_id: str) -> bool:
        flight = self._flights.get(side)
        return flight is not None and flight.migration_id == migration_id
