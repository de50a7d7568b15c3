"""mig's ``x-query-migration-advice`` extension: how a migration of this host would go, and what to use."""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, Int, QapiStruct, Str, UnsetType


class XQueryMigrationAdviceArgs(QapiStruct):
    """``uri``: the destination's migration address to probe the link to (it must be waiting for the
    migration: ``migrate-incoming`` done); without it the link is taken to be ``max-bandwidth``.
    ``calc-time``: milliseconds to measure the dirty rate for (200 to 10000, default 1000)."""

    uri: Str | UnsetType = UNSET
    calc_time: Int | UnsetType = UNSET


class DirtyCurvePoint(QapiStruct):
    """Distinct bytes dirtied within a window of ``window-ms``."""

    window_ms: Int
    bytes: Int


class MigrationPrediction(QapiStruct, kw_only=True):
    """One strategy's predicted course: ``total-time`` and ``downtime`` in ms, ``passes`` as
    dirty-sync-count counts them (absent when it will not converge)."""

    strategy: Str
    available: Bool
    converges: Bool
    total_time: Int | UnsetType = UNSET
    passes: Int | UnsetType = UNSET
    downtime: Int | UnsetType = UNSET
    cpu_throttle_percentage: Int | UnsetType = UNSET
    reason: Str | UnsetType = UNSET


class MigrationAdvice(QapiStruct, kw_only=True):
    """Measurements (bytes, bytes per second, ms) and the predictions made from them."""

    dirty_rate: Int  # bytes/s: distinct pages in one second (calc-dirty-rate's figure, in bytes)
    write_rate: Int  # bytes/s in the shortest window measured
    dirty_curve: list[DirtyCurvePoint]
    ram_size: Int
    ram_to_send: Int  # pages that hold data
    bandwidth: Int  # bytes/s the passes would go at
    link_bandwidth: Int | UnsetType = UNSET  # bytes/s measured to the destination
    downtime_limit: Int
    predictions: list[MigrationPrediction]
    recommendation: Str
    reason: Str
