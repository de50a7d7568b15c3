"""QEMU's job layer as QMP sees it (qapi/job.json): job types, statuses, verbs, JobInfo, the event."""

from __future__ import annotations

from mig_core.qapi import UNSET, Int, QapiEnum, QapiStruct, Str, UnsetType


class JobType(QapiEnum):
    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"
    CREATE = "create"
    AMEND = "amend"
    SNAPSHOT_LOAD = "snapshot-load"
    SNAPSHOT_SAVE = "snapshot-save"
    SNAPSHOT_DELETE = "snapshot-delete"


class JobStatus(QapiEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(QapiEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"
    CHANGE = "change"


class JobInfo(QapiStruct):
    id: Str
    type: JobType
    status: JobStatus
    current_progress: Int
    total_progress: Int
    error: Str | UnsetType = UNSET


class JobIdArgs(QapiStruct):
    id: Str


class JobStatusChangeEventData(QapiStruct):
    id: Str
    status: JobStatus
