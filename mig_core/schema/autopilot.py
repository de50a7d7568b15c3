"""mig's autopilot extension: ``x-set-migration-autopilot``, ``x-query-migration-autopilot``, ``MIG_AUTOPILOT``."""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, Int, QapiStruct, Str, UnsetType


class XSetMigrationAutopilotArgs(QapiStruct):
    """``enabled``: whether the autopilot steers migrations from this host; ``stalled-passes``: passes
    without progress before it acts (1 to 100, default 3); ``deadline``: ms after which a migration still
    running calls for action (0: none, the default). Omitted members keep their values."""

    enabled: Bool
    stalled_passes: Int | UnsetType = UNSET
    deadline: Int | UnsetType = UNSET


class AutopilotDecision(QapiStruct):
    """One decision: at which pass, what it did (``postcopy``, ``dirty-limit``, ``auto-converge``), the
    lever's new setting, and why."""

    #: the dirty sync (dirty-sync-count) it acted at
    pass_: Int
    action: Str
    applied: Str
    reason: Str


class MigrationAutopilotInfo(QapiStruct):
    """The settings, and the decisions taken in the current or last migration."""

    enabled: Bool
    stalled_passes: Int
    deadline: Int
    decisions: list[AutopilotDecision]
