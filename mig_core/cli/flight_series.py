"""A flight record (``mig run --flight-dir`` JSON lines, or ``x-query-migration-record``'s list) read back
as the series ``mig report`` plots: per pass, against time, and the switchover decision."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("mig.report")

_MB = 1e6
#: ``<migration id>-<side>.jsonl``, the recorder's file name
_RECORDER_NAME = re.compile(r"[0-9a-f]{32}-(source|destination)")


class RecordError(ValueError):
    """A file that is not a flight record."""


@dataclass
class Pass:
    """One pass: from the previous dirty sync to this one."""

    number: int
    end_s: float
    bandwidth_mb_s: float  # what was sent in the pass, per second of it
    dirty_rate_mb_s: float  # what was dirtied in the pass (found at its sync), per second of it


@dataclass
class Switchover:
    """The machine stopped: what was left, what the source expected, against the limit."""

    at_s: float
    remaining: int
    expected_downtime_ms: int | None
    downtime_limit_ms: int | None


@dataclass
class FlightSeries:
    """What a report shows of one record."""

    label: str
    side: str
    settings: dict[str, Any]
    passes: list[Pass] = field(default_factory=list)
    #: (seconds since the start, remaining bytes, budget bytes: what downtime-limit lets go at the current rate)
    remaining: list[tuple[float, int, float | None]] = field(default_factory=list)
    #: (seconds, cpu-throttle-percentage) whenever it changes, and (seconds, dirty-limit µs per round)
    throttle: list[tuple[float, int]] = field(default_factory=list)
    dirty_limit: list[tuple[float, int]] = field(default_factory=list)
    statuses: list[tuple[float, str]] = field(default_factory=list)
    switchover: Switchover | None = None
    end: dict[str, Any] = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        """Seconds from the start to the last figure or status change."""
        return max([s for s, _, _ in self.remaining] + [s for s, _ in self.statuses] + [0.0])

    @property
    def status(self) -> str:
        return str(self.end.get("status") or (self.statuses[-1][1] if self.statuses else "unknown"))


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file or of a JSON list (as x-query-migration-record returns it).

    A JSON-lines file whose last line is cut short (its writer died mid-line) gives the records before
    it, with a warning: that is when the record is wanted most."""
    try:
        text = path.read_text()
    except OSError as e:
        raise RecordError(f"{path}: {e.strerror}") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else _lines(path, text)
    except ValueError as e:
        raise RecordError(f"{path}: not JSON lines nor a JSON list: {e}") from None
    if not isinstance(records, list) or not records or not all(_is_record(r) for r in records):
        raise RecordError(f"{path}: not a flight record (each record needs 'kind' and 'ms')")
    for i, r in enumerate(records, 1):
        need = _NEEDS.get(r["kind"])
        if need is not None and need not in r:
            raise RecordError(f"{path}: record {i} ({r['kind']}) has no '{need}'")
    return records


#: what ``series`` reads of a record of each kind besides 'kind' and 'ms'
_NEEDS = {"status": "status", "pass": "pass"}


def _is_record(r: object) -> bool:
    ms = r.get("ms") if isinstance(r, dict) else None
    return (isinstance(r, dict) and isinstance(r.get("kind"), str) and isinstance(ms, int | float)
            and not isinstance(ms, bool))


def _lines(path: Path, text: str) -> list[Any]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i < len(lines) or text.endswith("\n"):
                raise ValueError(f"line {i}: {e}") from None
            log.warning("flight_record_cut_short", path=str(path), line=i, records=len(out))
    return out


def label_for(path: Path) -> str:
    """The recorder's ``<id>-<side>`` name says little: the folder names the run (e.g. a benchmark cell)."""
    m = _RECORDER_NAME.fullmatch(path.stem)
    return f"{path.parent.name} · {m.group(1)}" if m else path.stem


def series(records: list[dict[str, Any]], label: str) -> FlightSeries:
    """Derive the plotted series; records are taken in time order."""
    records = sorted(records, key=lambda r: r["ms"])
    settings = next((r for r in records if r["kind"] == "start"), {})
    out = FlightSeries(label, str(settings.get("side", "source")),
                       {k: v for k, v in settings.items() if k not in ("kind", "t", "ms", "side")})
    limit = out.settings.get("downtime-limit")
    last: dict[str, Any] | None = None
    throttle = dirty_limit = None
    for r in records:
        s = r["ms"] / 1000
        kind = r["kind"]
        if kind == "status":
            out.statuses.append((s, r["status"]))
            continue
        if kind == "end":
            out.end = r
        if kind == "pass":
            # the sync in the switchover ends no pass of its own: the machine was stopped
            if last is not None and r["ms"] > last["ms"] and out.switchover is None:
                dt = (r["ms"] - last["ms"]) / 1000
                sent = r.get("transferred", 0) - last.get("transferred", 0)  # none yet at the first sync
                out.passes.append(Pass(r["pass"], s, sent / dt / _MB, r.get("dirty-bytes", 0) / dt / _MB))
            last = r
        if kind == "switchover":
            out.switchover = Switchover(s, int(r.get("remaining", 0)), r.get("expected-downtime"), limit)
        if "remaining" in r and kind in ("pass", "second", "switchover", "end"):
            budget = r["mbps"] * _MB / 8 * limit / 1000 if limit is not None and r.get("mbps") else None
            out.remaining.append((s, int(r["remaining"]), budget))
        pct = r.get("cpu-throttle-percentage")
        if pct is not None and pct != throttle:
            out.throttle.append((s, int(pct)))
            throttle = pct
        per_round = r.get("dirty-limit-throttle-time-per-round")
        if per_round is not None and per_round != dirty_limit:
            out.dirty_limit.append((s, int(per_round)))
            dirty_limit = per_round
    return out
