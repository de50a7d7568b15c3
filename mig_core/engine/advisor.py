"""The migration advisor's model: from a measured dirty curve and link, predict how each strategy would go.

``predict`` replays the source's own rules pass by pass on a simulated clock: the first pass sends every
page that holds data at the migration's bandwidth; each later pass sends what the one before found dirty;
a pass of length t finds ``curve.bytes_in(t)`` dirty (distinct pages, so it saturates at the RAM); after
the second pass the source switches over once the rest fits ``downtime-limit`` (the precopy engine's test,
bandwidth included), and the rest then goes at the link's own speed (the rate limit does not hold the
machine stopped). Auto-converge and dirty-limit follow ``ConvergenceTrigger``'s period and step rules; a
throttled vCPU is taken to dirty in proportion to the time it runs (a busy guest: auto-converge's premise),
and a dirty limit holds from one limiter period after it is applied (its first measurement).
Postcopy switches after the first pass: the destination runs at once and the rest follows on demand.

A strategy "will not converge" when a pass leaves as much as it sent (≥ 90 % of it, five passes running)
with nothing left to tighten, or the replay passes an hour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("precopy", "auto-converge", "dirty-limit", "postcopy")
#: what a switchover costs besides sending (stop, last sync, the destination's answer), ms
FIXED_MS = 3.0
#: each pass's own cost (dirty sync, the return path's ping), seconds
PASS_OVERHEAD_S = 0.002
STALL_RATIO = 0.9
STALL_PASSES = 5
HORIZON_S = 3600.0
MAX_PASSES = 10_000
_MB = 1e6


@dataclass(frozen=True)
class DirtyCurve:
    """Distinct bytes dirtied within a window of each length, as measured (seconds, bytes, increasing).

    Between points it is linear (from 0 at 0); past the longest window it grows at the last segment's rate;
    never past ``ceiling`` (the RAM that can be dirtied)."""

    points: tuple[tuple[float, float], ...]
    ceiling: float

    def bytes_in(self, seconds: float) -> float:
        if seconds <= 0 or not self.points:
            return 0.0
        prev = (0.0, 0.0)
        for t, b in self.points:
            if seconds <= t:
                return min(self.ceiling, prev[1] + (b - prev[1]) * (seconds - prev[0]) / (t - prev[0]))
            prev = (t, b)
        slope = self.marginal_rate
        return min(self.ceiling, prev[1] + slope * (seconds - prev[0]))

    @property
    def marginal_rate(self) -> float:
        """Bytes per second the curve grows by at its longest window (new pages, not rewrites)."""
        pts = ((0.0, 0.0),) + self.points
        (t0, b0), (t1, b1) = pts[-2], pts[-1]
        return max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0

    @property
    def write_rate(self) -> float:
        """Bytes per second over the shortest window: the closest figure to the rate the program writes at."""
        t, b = self.points[0]
        return b / t if t > 0 else 0.0

    def rate_over(self, seconds: float) -> float:
        """Distinct bytes per second within a window of ``seconds`` (calc-dirty-rate's figure for that period)."""
        return self.bytes_in(seconds) / seconds if seconds > 0 else 0.0

    @property
    def saturated(self) -> bool:
        """The program dirtied (nearly) all its RAM within the shortest window: the write rate is a floor."""
        return bool(self.points) and self.points[0][1] >= 0.9 * self.ceiling


@dataclass(frozen=True)
class Situation:
    """What a prediction starts from: the measurements and the migration's settings."""

    first_pass_bytes: float  # pages that hold data (zero pages cost a header, not a page)
    curve: DirtyCurve
    bandwidth: float  # bytes/s the passes go at (max-bandwidth, or the link where it is slower)
    link_bandwidth: float  # bytes/s of the link itself (what the switchover's rest goes at)
    downtime_limit_ms: float
    vcpus: int
    params: Mapping[str, Any]  # the throttle parameters and vcpu-dirty-limit, as migrate-set-parameters names them


@dataclass
class Prediction:
    """One strategy's predicted course."""

    strategy: str
    converges: bool
    total_ms: float | None = None
    passes: int | None = None  # dirty syncs, as query-migrate's dirty-sync-count counts them
    downtime_ms: float | None = None
    throttle_pct: int | None = None  # auto-converge: the throttle it ends at
    reason: str = ""
    course: list[tuple[float, float]] = field(default_factory=list)  # (seconds, bytes left) after each pass


class _Trigger:
    """ConvergenceTrigger's period accounting on the simulated clock."""

    def __init__(self, threshold_pct: float) -> None:
        self.threshold = threshold_pct / 100
        self.start = self.xfer_start = self.dirty = 0.0
        self.over = 0

    def on_sync(self, now: float, dirty: float, transferred: float) -> bool:
        """True when throttling steps up at this sync."""
        self.dirty += dirty
        if now - self.start < 1.0:
            return False
        step = False
        if self.dirty > (transferred - self.xfer_start) * self.threshold:
            self.over += 1
            if self.over >= 2:
                self.over = 0
                step = True
        self.start, self.xfer_start, self.dirty = now, transferred, 0.0
        return step


def _next_throttle(pct: int, p: Mapping[str, Any], dirty: float, threshold: float) -> int:
    if not pct:
        new = int(p["cpu-throttle-initial"])
    else:
        inc = int(p["cpu-throttle-increment"])
        if p.get("cpu-throttle-tailslow"):
            cpu_now = 100 - pct
            inc = max(0, min(inc, int(cpu_now - cpu_now * threshold / dirty))) if dirty else inc
        new = pct + inc
    return max(1, min(new, int(p["max-cpu-throttle"]), 99))


def predict(s: Situation, strategy: str) -> Prediction:
    """Replay a migration of ``strategy`` (one of ``STRATEGIES``) on the simulated clock."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'")
    bw = s.bandwidth
    if bw <= 0:
        return Prediction(strategy, False, reason="no bandwidth to migrate at")
    p = s.params
    write_rate = s.curve.write_rate
    limit_rate = s.vcpus * float(p.get("vcpu-dirty-limit", 1)) * _MB
    budget = bw * max(0.0, s.downtime_limit_ms - FIXED_MS) / 1000
    trigger = _Trigger(float(p.get("throttle-trigger-threshold", 50)))
    now, transferred, to_send = 0.0, 0.0, s.first_pass_bytes
    factor, pct, limited = 1.0, 0, False
    syncs, stalled = 1, 0  # the setup's sync is the first
    course: list[tuple[float, float]] = []
    limit_from: float | None = None  # dirty-limit: when the limiter's first period has measured and throttled
    while True:
        dt = to_send / bw + PASS_OVERHEAD_S
        if limit_from is not None and now < limit_from < now + dt:  # the limit bites within this pass
            dirtied = s.curve.bytes_in(limit_from - now) + s.curve.bytes_in(now + dt - limit_from) * factor
            dirtied = min(dirtied, s.curve.ceiling)
        elif limit_from is not None and limit_from >= now + dt:
            dirtied = s.curve.bytes_in(dt)
        else:
            dirtied = s.curve.bytes_in(dt) * factor
        now += dt
        transferred += to_send
        syncs += 1
        course.append((now, dirtied))
        if strategy == "postcopy":  # the switch after the first pass; the rest goes while the destination runs
            downtime = FIXED_MS
            total = now * 1000 + downtime + dirtied / bw * 1000
            return Prediction(strategy, True, round(total), syncs, downtime, reason=(
                f"the destination runs after {now:.1f} s; the {dirtied / _MB:.0f} MB dirtied meanwhile follow in "
                f"{dirtied / bw:.1f} s, its first touches of them waiting on the link"), course=course)
        # the engine counts periods from the sync after the first pass on
        if strategy in ("auto-converge", "dirty-limit") and trigger.on_sync(now, dirtied, transferred):
            if strategy == "auto-converge":
                pct = _next_throttle(pct, p, dirtied, transferred * trigger.threshold)
                factor = 1 - pct / 100
            elif not limited:
                limited = True
                factor = min(1.0, limit_rate / write_rate) if write_rate else 1.0
                limit_from = now + float(p.get("x-vcpu-dirty-limit-period", 1000)) / 1000
        # no bandwidth estimate before a dirty pass was sent: only an empty rest switches over after the first
        if dirtied == 0 or (syncs > 2 and dirtied <= budget):
            downtime = dirtied / s.link_bandwidth * 1000 + FIXED_MS
            return Prediction(strategy, True, round(now * 1000 + downtime), syncs + 1, round(downtime, 1),
                              pct or None, course=course)
        tightening = (strategy == "auto-converge" and pct < min(99, int(p["max-cpu-throttle"]))) or (
            strategy == "dirty-limit" and not limited)
        stalled = stalled + 1 if dirtied >= STALL_RATIO * to_send and not tightening else 0
        if stalled >= STALL_PASSES or now > HORIZON_S or syncs > MAX_PASSES:
            why = (f"each pass leaves {dirtied / _MB:.0f} MB dirty against {budget / _MB:.0f} MB that fit "
                   f"downtime-limit: the program dirties as fast as {bw / _MB:.0f} MB/s can carry it away")
            return Prediction(strategy, False, throttle_pct=pct or None, reason=why, course=course)
        to_send = dirtied


def recommend(predictions: Sequence[Prediction], available: Mapping[str, bool]) -> tuple[str, str]:
    """The strategy to use and why: plain precopy when it converges (nothing slows the program); else the
    fastest of what this host can do, postcopy only when it is twice as fast (the destination runs on pages
    still in flight, and a link lost in postcopy needs recovery)."""
    by = {p.strategy: p for p in predictions}
    plain = by.get("precopy")
    if plain is not None and plain.converges:
        return "precopy", (f"plain precopy converges in {plain.passes} passes and {(plain.total_ms or 0) / 1000:.1f} "
                           f"s with {plain.downtime_ms or 0:.0f} ms downtime, without slowing the program")
    options = [p for p in predictions if p.converges and p.strategy != "precopy" and available.get(p.strategy)]
    if not options:
        missing = [p.strategy for p in predictions if p.converges and not available.get(p.strategy)]
        hint = f"; {', '.join(missing)} would, if enabled" if missing else ""
        return "none", f"no strategy this host can use converges{hint}"
    throttled = [p for p in options if p.strategy != "postcopy"]
    post = by.get("postcopy")
    best = min(throttled, key=lambda p: p.total_ms or 0.0) if throttled else None
    if post is not None and post in options and (best is None or (post.total_ms or 0) * 2 <= (best.total_ms or 0)):
        why = "the only option that converges" if best is None else \
            f"twice as fast as {best.strategy} ({(best.total_ms or 0) / 1000:.1f} s)"
        return "postcopy", f"plain precopy does not converge; postcopy is {why}"
    assert best is not None
    return best.strategy, (f"plain precopy does not converge; {best.strategy} does in {best.passes} passes and "
                           f"{(best.total_ms or 0) / 1000:.1f} s")
