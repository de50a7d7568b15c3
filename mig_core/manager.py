"""MigrationManager: one per machine; each QMP command is the method of the same (snake-case) name."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pluggy
import structlog

import mig_core
from mig_core import capabilities as caps_mod
from mig_core import host_features
from mig_core import parameters as params_mod
from mig_core.errors import QMPError
from mig_core.events import EventEmitter
from mig_core.hooks import make_plugin_manager
from mig_core.plugin_registry import PluginRegistry
from mig_core.qapi import UNSET, to_qmp
from mig_core.machine.machine import Machine
from mig_core.schema.commands import MigrateSetCapabilitiesArgs, MigrationEventData
from mig_core.schema.common import RunState, ShutdownCause, ShutdownEventData, StatusInfo, VersionInfo, VersionTriple
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationCapabilityStatus, MigrationInfo
from mig_core.schema.migration import MigrationStatus as S
from mig_core.status import POSTCOPY_STATES, RUNNING_STATES, Side, StatusMachine

log = structlog.get_logger("mig.manager")

#: The schema level mig implements, reported as the QEMU version in the greeting.
SCHEMA_VERSION = VersionTriple(major=9, minor=1, micro=0)

#: Destination states that query-migrate reports (QEMU's fill_destination_migration_info).
_REPORTED_INCOMING = frozenset({S.SETUP, S.CANCELLING, S.CANCELLED, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                                S.POSTCOPY_RECOVER, S.FAILED, S.COLO, S.COMPLETED})


class MigrationManager:
    """The control plane of one machine: capabilities, parameters, statuses, run state, events."""

    def __init__(
        self,
        machine: Machine | None = None,
        *,
        runstate: RunState = RunState.RUNNING,
        registry: PluginRegistry | None = None,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self.registry = registry or (machine.registry if machine else PluginRegistry.from_environment())
        self.machine = machine or Machine(runstate=runstate, registry=self.registry)
        self.pm = pm or make_plugin_manager(self.registry)
        self.events = EventEmitter(self.pm)
        self.run = self.machine.run
        self.run.add_listener(self._on_runstate)
        self.source = StatusMachine(Side.SOURCE, self._on_status)
        self.destination = StatusMachine(Side.DESTINATION, self._on_status)
        self.caps: dict[C, bool] = caps_mod.defaults()
        self.params: dict[str, Any] = params_mod.defaults()
        self.migration_id = ""
        self.error_desc: str | None = None
        self._incoming_listening = False
        self._incoming_rdma = False
        #: Set after ``quit`` has been answered; the host process exits when it sees it.
        self.quit_requested = threading.Event()
        #: Called with the reason when a running outgoing migration must stop (the engine registers it).
        self.cancel_outgoing: Callable[[], None] | None = None
        self._lock = threading.RLock()
        #: Descriptors named with ``getfd`` (``fd:NAME`` migration URIs use them).
        self.named_fds: dict[str, int] = {}

    # -- notifications ---------------------------------------------------------

    def _on_status(self, side: Side, old: S, new: S) -> None:
        if self.caps[C.EVENTS]:
            self.events.emit("MIGRATION", MigrationEventData(status=new))
        self.pm.hook.mig_status_changed(side=side, old=old, new=new, migration_id=self.migration_id)

    def _on_runstate(self, old: RunState, new: RunState, running: bool) -> None:
        was_running = old in (RunState.RUNNING, RunState.COLO)
        if was_running and not running:
            self.events.emit("STOP")
        elif running and not was_running:
            self.events.emit("RESUME")
        self.pm.hook.mig_runstate_changed(old=old, new=new, running=running)

    # -- capability rule context -------------------------------------------------

    @property
    def runstate(self) -> RunState:
        return self.run.state

    def incoming_started(self) -> bool:
        return self._incoming_listening

    def incoming_rdma(self) -> bool:
        return self._incoming_rdma

    def multifd_compression(self) -> str:
        return str(self.params["multifd-compression"])

    def tls_enabled(self) -> bool:
        return bool(self.params["tls-creds"])

    def postcopy_unsupported(self) -> str | None:
        return host_features.postcopy_unsupported()

    def background_snapshot_unsupported(self) -> str | None:
        return host_features.background_snapshot_unsupported()

    def memory_unsuitable_for_background_snapshot(self) -> bool:
        return False

    def replication_available(self) -> bool:
        return "colo" in self.registry.names("mig_core.replication")

    def per_vcpu_dirty_available(self) -> bool:
        try:
            return self.machine.tracker_class().attributes_vcpus
        except (ValueError, LookupError):
            return False

    # -- QMP: machine ------------------------------------------------------------

    def query_version(self) -> VersionInfo:
        return VersionInfo(qemu=SCHEMA_VERSION, package=f"mig {mig_core.__version__}")

    def query_status(self) -> StatusInfo:
        return StatusInfo(running=self.run.running, status=self.run.state)

    def stop(self) -> None:
        self.run.stop()

    def cont(self) -> None:
        self.run.cont()

    def quit(self) -> None:
        self.events.emit("SHUTDOWN", ShutdownEventData(guest=False, reason=ShutdownCause.HOST_QMP_QUIT))
        self.quit_requested.set()

    def pmemsave(self, args: Any) -> None:
        """Write guest-physical memory (RAM blocks end to end, in order) to a file."""
        try:
            pieces = self.machine.guest_physical(args.val, args.size)
        except ValueError:
            raise QMPError(f"Invalid addr 0x{args.val & (2**64 - 1):016x}/size {args.size} specified") from None
        try:
            f = open(args.filename, "wb")
        except OSError as e:
            raise QMPError(f"Could not open '{args.filename}': {e.strerror}") from None
        with f:
            for block, offset, length in pieces:
                f.write(block.view[offset:offset + length])

    # -- QMP: capabilities and parameters ------------------------------------------

    def query_migrate_capabilities(self) -> list[MigrationCapabilityStatus]:
        return [MigrationCapabilityStatus(capability=c, state=v) for c, v in self.caps.items()]

    def migrate_set_capabilities(self, args: MigrateSetCapabilitiesArgs) -> None:
        with self._lock:
            if self.source.state in RUNNING_STATES:
                raise QMPError("There's a migration process in progress")
            new = caps_mod.overlay(self.caps, args.capabilities)
            caps_mod.check(new, self.caps, self)
            self.caps = new
        log.info("capabilities_set", on=[c.value for c, v in new.items() if v])

    def query_migrate_parameters(self) -> Any:
        return params_mod.to_struct(self.params)

    def migrate_set_parameters(self, args: Any) -> None:
        with self._lock:
            ctx = params_mod.CheckContext(caps=self.caps, registry=self.registry)
            self.params = params_mod.merge(self.params, args, ctx)
        log.info("parameters_set", changed=sorted(to_qmp(args)))

    # -- QMP: migration status -------------------------------------------------------

    def query_migrate(self) -> MigrationInfo:
        info = MigrationInfo()
        incoming = self.destination.state
        if incoming in _REPORTED_INCOMING:
            info.status = incoming
        outgoing = self.source.state
        if outgoing is not S.NONE:
            info.status = outgoing
        if self.error_desc and info.status is not UNSET:
            info.error_desc = self.error_desc
        return info

    def migrate_cancel(self) -> None:
        with self._lock:
            state = self.source.state
            if state in POSTCOPY_STATES:
                raise QMPError("Postcopy migration in progress, cannot cancel.")
            if state not in RUNNING_STATES or state is S.CANCELLING:
                return
            while self.source.state in RUNNING_STATES - {S.CANCELLING} - POSTCOPY_STATES:
                if self.source.cas(self.source.state, S.CANCELLING):
                    break
            stop = self.cancel_outgoing
        if stop is not None:
            stop()

    def migrate_pause(self) -> None:
        # Out-of-band capable. Until postcopy lands neither side can be in postcopy-active or
        # postcopy-recover, so every call gets QEMU's state error.
        raise QMPError("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

    # -- QMP: file descriptors ---------------------------------------------------------

    def getfd(self, args: Any, session_fds: list[int]) -> None:
        """Name the most recent descriptor passed on this monitor connection (SCM_RIGHTS)."""
        if not session_fds:
            raise QMPError("No file descriptor supplied via SCM_RIGHTS")
        if args.fdname[:1].isdigit():
            raise QMPError("File descriptor names can't start with a digit")
        fd = session_fds.pop()
        with self._lock:
            old = self.named_fds.pop(args.fdname, None)
            self.named_fds[args.fdname] = fd
        if old is not None:
            os.close(old)

    def closefd(self, args: Any, session_fds: list[int]) -> None:
        with self._lock:
            fd = self.named_fds.pop(args.fdname, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{args.fdname}' not found")
        os.close(fd)

    # -- helpers for the engine --------------------------------------------------------

    def new_migration_id(self) -> str:
        self.migration_id = uuid.uuid4().hex
        return self.migration_id

