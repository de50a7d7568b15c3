"""``x-query-migration-advice``: measure this host's dirty curve and the link, predict every strategy, pick one.

The measuring (a tracker consumer for ``calc-time``, a zero-page scan, a short link probe to the
destination's waiting listener) happens in the command, which returns when it is done. The advice is kept:
the next migration's flight record starts with it (``advice``) and ends comparing it with the outcome
(``verdict``).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import structlog

from mig_core.control import addresses
from mig_core.control.status import RUNNING_STATES, StatusMachine
from mig_core.engine import advisor, dirty_curve, link_probe
from mig_core.errors import QMPError
from mig_core.ext.transport import TransportContext, TransportError, TransportRegistry
from mig_core.machine.machine import Machine
from mig_core.memory.zeropage import nonzero_pages
from mig_core.qapi import UNSET, to_qmp
from mig_core.schema.advice import DirtyCurvePoint, MigrationAdvice, MigrationPrediction, XQueryMigrationAdviceArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationAddressType
from mig_core.schema.migration import MigrationCapability as C

log = structlog.get_logger("mig.advisor")

DEFAULT_CALC_MS = 1000
CALC_RANGE_MS = (200, 10000)
PROBE_S = 0.25
#: advice older than this is not attached to a migration's record
FRESH_S = 600.0
_PARAMS = ("cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle",
           "throttle-trigger-threshold", "vcpu-dirty-limit", "x-vcpu-dirty-limit-period")


class AdvisedHost(Protocol):
    """What the advisor uses of the manager."""

    machine: Machine
    params: dict[str, Any]
    caps: dict[C, bool]
    source: StatusMachine
    transports: TransportRegistry

    def per_vcpu_dirty_available(self) -> bool: ...

    def transport_context(self) -> TransportContext: ...


class Advisor:
    """One machine's advisor; ``last`` is the latest advice (QMP form) and when it was given."""

    def __init__(self, manager: AdvisedHost) -> None:
        self.manager = manager
        self.last: tuple[float, dict[str, Any]] | None = None

    def advise(self, args: XQueryMigrationAdviceArgs) -> MigrationAdvice:
        m = self.manager
        calc_ms = args.calc_time if isinstance(args.calc_time, int) else DEFAULT_CALC_MS
        if not CALC_RANGE_MS[0] <= calc_ms <= CALC_RANGE_MS[1]:
            raise QMPError(f"Parameter 'calc-time' must be between {CALC_RANGE_MS[0]} and {CALC_RANGE_MS[1]} ms")
        if m.source.state in RUNNING_STATES:
            raise QMPError("There's a migration process in progress")
        if m.machine.run.state is RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if not m.machine.blocks:
            raise QMPError("This machine has no RAM to migrate")
        uri = args.uri if isinstance(args.uri, str) else None
        link = self._probe(uri) if uri is not None else None
        max_bw = float(m.params["max-bandwidth"])
        if not max_bw and link is None:
            raise QMPError("With max-bandwidth 0 (unlimited) the advisor needs 'uri' to measure the link")
        bandwidth = min(max_bw, link) if max_bw and link else (link or max_bw)
        curve = dirty_curve.measure(m.machine, calc_ms / 1000)
        situation = advisor.Situation(
            first_pass_bytes=float(self._bytes_with_data()), curve=curve, bandwidth=bandwidth,
            link_bandwidth=link or bandwidth, downtime_limit_ms=float(m.params["downtime-limit"]),
            vcpus=max(1, len(m.machine.vcpus.vcpus)), params={k: m.params[k] for k in _PARAMS})
        available = {"precopy": True, "auto-converge": True, "dirty-limit": m.per_vcpu_dirty_available(),
                     "postcopy": bool(m.caps[C.POSTCOPY_RAM])}
        predictions = [advisor.predict(situation, s) for s in advisor.STRATEGIES]
        choice, why = advisor.recommend(predictions, available)
        advice = MigrationAdvice(
            dirty_rate=round(curve.rate_over(1.0)), write_rate=round(curve.write_rate),
            dirty_curve=[DirtyCurvePoint(window_ms=round(t * 1000), bytes=round(b)) for t, b in curve.points],
            ram_size=round(curve.ceiling), ram_to_send=round(situation.first_pass_bytes),
            bandwidth=round(bandwidth), downtime_limit=int(situation.downtime_limit_ms),
            predictions=[_qmp(p, available[p.strategy]) for p in predictions], recommendation=choice, reason=why)
        if link is not None:
            advice.link_bandwidth = round(link)
        log.info("migration_advice", recommendation=choice, reason=why, dirty_rate=advice.dirty_rate,
                 bandwidth=advice.bandwidth, link_bandwidth=link)
        self.last = (time.monotonic(), to_qmp(advice))
        return advice

    def _probe(self, uri: str) -> float:
        cls, addr = addresses.resolve(self.manager.transports, uri, UNSET, incoming=False)
        if addr.tag is not MigrationAddressType.SOCKET:
            raise QMPError(f"The link probe needs a socket address (tcp, unix, vsock, fd), not '{addr.tag.value}'")
        transport = cls(self.manager.transport_context())
        try:
            transport.check_address(addr, incoming=False)
            channel = transport.connect(addr, lambda: False)
        except TransportError as e:
            raise QMPError(f"The link probe could not connect: {e.desc}") from None
        try:
            result = link_probe.probe(channel, PROBE_S)
        except link_probe.ProbeError as e:
            raise QMPError(f"The link probe to '{uri}' failed (is the destination waiting for this "
                           f"migration?): {e}") from None
        return result.bytes_per_second

    def _bytes_with_data(self) -> int:
        total = 0
        for b in self.manager.machine.blocks:
            words = b.array.view(np.uint64).reshape(b.npages, -1)
            total += len(nonzero_pages(words, np.arange(b.npages))) * b.page_size
        return total

    # -- the flight record's view ----------------------------------------------------------

    def fresh(self) -> dict[str, Any] | None:
        """The latest advice if it is recent enough to speak for the migration starting now."""
        if self.last is None or time.monotonic() - self.last[0] > FRESH_S:
            return None
        return self.last[1]


def _qmp(p: advisor.Prediction, available: bool) -> MigrationPrediction:
    out = MigrationPrediction(strategy=p.strategy, available=available, converges=p.converges)
    if p.total_ms is not None:
        out.total_time = round(p.total_ms)
    if p.passes is not None:
        out.passes = p.passes
    if p.downtime_ms is not None:
        out.downtime = round(p.downtime_ms)
    if p.throttle_pct is not None:
        out.cpu_throttle_percentage = p.throttle_pct
    if p.reason:
        out.reason = p.reason
    return out


def strategy_used(records: list[dict[str, Any]]) -> str:
    """What a recorded migration did: postcopy if it switched, else its convergence capability, else precopy."""
    if any(r.get("kind") == "status" and r.get("status") == "postcopy-active" for r in records):
        return "postcopy"
    start = next((r for r in records if r.get("kind") == "start"), {})
    caps = set(start.get("capabilities", ()))
    return next((s for s in ("auto-converge", "dirty-limit") if s in caps), "precopy")


def verdict(records: list[dict[str, Any]], end: dict[str, Any]) -> dict[str, Any] | None:
    """The advice a migration started with, beside what happened (a ``verdict`` record); None without advice."""
    start = next((r for r in records if r.get("kind") == "start"), {})
    advice = start.get("advice")
    if not advice:
        return None
    used = strategy_used(records)
    pred = next((p for p in advice["predictions"] if p["strategy"] == used), None)
    if pred is None:
        return None
    out: dict[str, Any] = {"strategy": used, "recommended": advice["recommendation"],
                           "predicted-converges": pred["converges"], "status": end.get("status")}
    for key, actual in (("total-time", end.get("total-time")), ("passes", end.get("dirty-sync-count")),
                        ("downtime", end.get("downtime"))):
        predicted = pred.get(key)
        out[f"predicted-{key}"] = predicted
        out[key] = actual
        if predicted is not None and actual:
            out[f"{key}-error-percent"] = round((predicted - actual) * 100 / actual, 1)
    return out
