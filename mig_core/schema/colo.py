"""COLO's commands beyond the QEMU struct types in ``migration.py``: xen-set-replication's arguments and
mig's ``x-query-colo-stats``."""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, Int, Number, QapiStruct, UnsetType


class XenSetReplicationArgs(QapiStruct):
    enable: Bool
    primary: Bool
    failover: Bool | UnsetType = UNSET


class ColoCompareStats(QapiStruct):
    """The primary's output comparison: messages held now and at most, the bound, matches and divergences."""

    queue_depth: Int
    max_queue_depth: Int
    queue_limit: Int
    matched: Int
    released_unmatched: Int
    mismatches: Int
    queue_full: Int


class ColoCheckpointReason(QapiStruct):
    """How many checkpoints came for one reason (periodic, mismatch, queue-full, request)."""

    reason: str
    count: Int


class ColoStats(QapiStruct):
    """mig's ``x-query-colo-stats``: the checkpoints of the current (or last) COLO run on this side, the
    comparison's figures (primary) and the last failover's duration."""

    mode: str
    checkpoints: Int
    reasons: list[ColoCheckpointReason]
    last_pause_ms: Number
    last_loaded_ms: Number
    max_pause_ms: Number
    total_pause_ms: Number
    last_pages: Int
    last_vmstate_bytes: Int
    compare: ColoCompareStats | UnsetType = UNSET
    failover_ms: Number | UnsetType = UNSET
