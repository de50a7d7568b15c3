"""QMP commands and events: names, argument types, return types and features.

The server dispatches a command to the ``MigrationManager`` method of the same
name in snake case; a declared command with no such method is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mig_core.qapi import UNSET, Any_, Bool, Int, Int64, QapiStruct, Str, UInt64, UnsetType
from mig_core.schema.advice import MigrationAdvice, XQueryMigrationAdviceArgs
from mig_core.schema.autopilot import AutopilotDecision, MigrationAutopilotInfo, XSetMigrationAutopilotArgs
from mig_core.schema.block import (
    BlockDeviceInfo,
    BlockDirtyBitmapAddArgs,
    BlockDirtyBitmapArgs,
    QueryNamedBlockNodesArgs,
)
from mig_core.schema.colo import ColoStats, XenSetReplicationArgs
from mig_core.schema.common import (
    CommandInfo,
    EmptyStruct,
    QmpCapabilitiesArgs,
    ShutdownEventData,
    StatusInfo,
    VersionInfo,
)
from mig_core.schema.jobs import JobIdArgs, JobInfo, JobStatusChangeEventData
from mig_core.schema.migration import (
    COLOExitReason,
    COLOMode,
    COLOStatus,
    DirtyLimitInfo,
    DirtyRateInfo,
    DirtyRateMeasureMode,
    MigrationCapabilityStatus,
    MigrationChannel,
    MigrationInfo,
    MigrationStatus,
    MigrationThreadInfo,
    ReplicationStatus,
    TimeUnit,
)
from mig_core.schema.objects import ObjectDelArgs, ObjectOptions
from mig_core.schema.parameters import MigrateSetParameters, MigrationParameters
from mig_core.schema.snapshots import XSnapshotInfo


class MigrateSetCapabilitiesArgs(QapiStruct):
    capabilities: list[MigrationCapabilityStatus]


class MigrateContinueArgs(QapiStruct):
    state: MigrationStatus


class MigrateArgs(QapiStruct):
    uri: Str | UnsetType = UNSET
    channels: list[MigrationChannel] | UnsetType = UNSET
    detach: Bool | UnsetType = UNSET
    resume: Bool | UnsetType = UNSET


class MigrateIncomingArgs(QapiStruct):
    uri: Str | UnsetType = UNSET
    channels: list[MigrationChannel] | UnsetType = UNSET
    exit_on_error: Bool | UnsetType = UNSET


class MigrateRecoverArgs(QapiStruct):
    uri: Str


class CalcDirtyRateArgs(QapiStruct):
    calc_time: Int64
    calc_time_unit: TimeUnit | UnsetType = UNSET
    sample_pages: Int | UnsetType = UNSET
    mode: DirtyRateMeasureMode | UnsetType = UNSET


class QueryDirtyRateArgs(QapiStruct):
    calc_time_unit: TimeUnit | UnsetType = UNSET


class SetVcpuDirtyLimitArgs(QapiStruct, kw_only=True):
    cpu_index: Int | UnsetType = UNSET
    dirty_rate: UInt64


class CancelVcpuDirtyLimitArgs(QapiStruct):
    cpu_index: Int | UnsetType = UNSET


class SnapshotSaveArgs(QapiStruct):
    job_id: Str
    tag: Str
    vmstate: Str
    devices: list[Str]


class SnapshotLoadArgs(QapiStruct):
    job_id: Str
    tag: Str
    vmstate: Str
    devices: list[Str]


class SnapshotDeleteArgs(QapiStruct):
    job_id: Str
    tag: Str
    devices: list[Str]


class XenSaveDevicesStateArgs(QapiStruct):
    filename: Str
    live: Bool | UnsetType = UNSET


class XenLoadDevicesStateArgs(QapiStruct):
    filename: Str


class XenSetGlobalDirtyLogArgs(QapiStruct):
    enable: Bool


class PmemsaveArgs(QapiStruct):
    val: Int
    size: Int
    filename: Str


class GetfdArgs(QapiStruct):
    fdname: Str


class MigrationEventData(QapiStruct):
    status: MigrationStatus


class MigrationPassEventData(QapiStruct, rename={"pass_": "pass"}):
    pass_: Int


class ColoExitEventData(QapiStruct):
    mode: COLOMode
    reason: COLOExitReason


class UnplugPrimaryEventData(QapiStruct):
    device_id: Str


@dataclass(frozen=True)
class Command:
    """One QMP command: argument struct (``boxed`` or not), reply type, OOB and features."""

    name: str
    args: type | None = None
    returns: Any = None
    allow_oob: bool = False
    features: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Event:
    name: str
    data: type | None = None
    features: tuple[str, ...] = field(default=())


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("qmp_capabilities", QmpCapabilitiesArgs, EmptyStruct),
        Command("query-version", None, VersionInfo),
        Command("query-commands", None, list[CommandInfo]),
        Command("query-status", None, StatusInfo),
        Command("stop", None, EmptyStruct),
        Command("cont", None, EmptyStruct),
        Command("quit", None, EmptyStruct),
        Command("pmemsave", PmemsaveArgs, EmptyStruct),
        Command("getfd", GetfdArgs, EmptyStruct),
        Command("closefd", GetfdArgs, EmptyStruct),
        Command("query-migrate", None, MigrationInfo),
        Command("migrate-set-capabilities", MigrateSetCapabilitiesArgs, EmptyStruct),
        Command("query-migrate-capabilities", None, list[MigrationCapabilityStatus]),
        Command("migrate-set-parameters", MigrateSetParameters, EmptyStruct),
        Command("query-migrate-parameters", None, MigrationParameters),
        Command("migrate-start-postcopy", None, EmptyStruct),
        Command("migrate_cancel", None, EmptyStruct),
        Command("migrate-continue", MigrateContinueArgs, EmptyStruct),
        Command("migrate", MigrateArgs, EmptyStruct),
        Command("migrate-incoming", MigrateIncomingArgs, EmptyStruct),
        Command("migrate-recover", MigrateRecoverArgs, EmptyStruct, allow_oob=True),
        Command("migrate-pause", None, EmptyStruct, allow_oob=True),
        Command("x-colo-lost-heartbeat", None, EmptyStruct, features=("unstable",)),
        Command("query-colo-status", None, COLOStatus),
        Command("xen-set-replication", XenSetReplicationArgs, EmptyStruct),
        Command("query-xen-replication-status", None, ReplicationStatus),
        Command("xen-colo-do-checkpoint", None, EmptyStruct),
        Command("x-query-colo-stats", None, ColoStats, features=("unstable",)),
        Command("calc-dirty-rate", CalcDirtyRateArgs, EmptyStruct),
        Command("query-dirty-rate", QueryDirtyRateArgs, DirtyRateInfo),
        Command("set-vcpu-dirty-limit", SetVcpuDirtyLimitArgs, EmptyStruct),
        Command("cancel-vcpu-dirty-limit", CancelVcpuDirtyLimitArgs, EmptyStruct),
        Command("query-vcpu-dirty-limit", None, list[DirtyLimitInfo]),
        Command("query-migrationthreads", None, list[MigrationThreadInfo]),
        Command("snapshot-save", SnapshotSaveArgs, EmptyStruct),
        Command("snapshot-load", SnapshotLoadArgs, EmptyStruct),
        Command("snapshot-delete", SnapshotDeleteArgs, EmptyStruct),
        Command("query-jobs", None, list[JobInfo]),
        Command("job-pause", JobIdArgs, EmptyStruct),
        Command("job-resume", JobIdArgs, EmptyStruct),
        Command("job-cancel", JobIdArgs, EmptyStruct),
        Command("job-complete", JobIdArgs, EmptyStruct),
        Command("job-dismiss", JobIdArgs, EmptyStruct),
        Command("job-finalize", JobIdArgs, EmptyStruct),
        Command("block-dirty-bitmap-add", BlockDirtyBitmapAddArgs, EmptyStruct),
        Command("block-dirty-bitmap-remove", BlockDirtyBitmapArgs, EmptyStruct),
        Command("block-dirty-bitmap-clear", BlockDirtyBitmapArgs, EmptyStruct),
        Command("block-dirty-bitmap-enable", BlockDirtyBitmapArgs, EmptyStruct),
        Command("block-dirty-bitmap-disable", BlockDirtyBitmapArgs, EmptyStruct),
        Command("query-named-block-nodes", QueryNamedBlockNodesArgs, list[BlockDeviceInfo]),
        Command("object-add", ObjectOptions, EmptyStruct),
        Command("object-del", ObjectDelArgs, EmptyStruct),
        Command("x-query-snapshots", None, list[XSnapshotInfo], features=("unstable",)),
        Command("x-query-migration-record", None, list[Any_], features=("unstable",)),
        Command("x-query-migration-advice", XQueryMigrationAdviceArgs, MigrationAdvice, features=("unstable",)),
        Command("x-set-migration-autopilot", XSetMigrationAutopilotArgs, EmptyStruct, features=("unstable",)),
        Command("x-query-migration-autopilot", None, MigrationAutopilotInfo, features=("unstable",)),
        Command("xen-save-devices-state", XenSaveDevicesStateArgs, EmptyStruct),
        Command("xen-load-devices-state", XenLoadDevicesStateArgs, EmptyStruct),
        Command("xen-set-global-dirty-log", XenSetGlobalDirtyLogArgs, EmptyStruct),
    ]
}

EVENTS: dict[str, Event] = {
    e.name: e
    for e in [
        Event("MIGRATION", MigrationEventData),
        Event("MIGRATION_PASS", MigrationPassEventData),
        Event("STOP"),
        Event("RESUME"),
        Event("SHUTDOWN", ShutdownEventData),
        Event("COLO_EXIT", ColoExitEventData),
        Event("UNPLUG_PRIMARY", UnplugPrimaryEventData),
        Event("JOB_STATUS_CHANGE", JobStatusChangeEventData),
        Event("MIG_AUTOPILOT", AutopilotDecision, features=("unstable",)),
    ]
}
