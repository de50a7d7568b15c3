"""The QMP pieces mig needs from outside migration.json: run state, version, commands."""

from __future__ import annotations

import enum

from mig_core.qapi import UNSET, Bool, Int, QapiEnum, QapiStruct, Str, UnsetType


class RunState(QapiEnum):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


class StatusInfo(QapiStruct):
    running: Bool
    status: RunState


class VersionTriple(QapiStruct):
    major: Int
    minor: Int
    micro: Int


class VersionInfo(QapiStruct):
    qemu: VersionTriple
    package: Str


class CommandInfo(QapiStruct):
    name: Str


class QMPCapability(QapiEnum):
    OOB = "oob"


class ShutdownCause(QapiEnum):
    NONE = "none"
    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_QMP_SYSTEM_RESET = "host-qmp-system-reset"
    HOST_SIGNAL = "host-signal"
    HOST_UI = "host-ui"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"
    SUBSYSTEM_RESET = "subsystem-reset"
    SNAPSHOT_LOAD = "snapshot-load"


class ShutdownEventData(QapiStruct):
    guest: Bool
    reason: ShutdownCause


class EmptyStruct(QapiStruct):
    """A command's empty argument set or empty ``{}`` reply."""


class QmpCapabilitiesArgs(QapiStruct):
    enable: list[QMPCapability] | UnsetType = UNSET


class Side(enum.Enum):
    """Which end of a migration a status, event or hook call belongs to (mig's own type, not in QAPI)."""

    SOURCE = "source"
    DESTINATION = "destination"
