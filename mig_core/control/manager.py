"""MigrationManager: one per machine; each QMP command is the method of the same (snake-case) name."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pluggy
import structlog

from mig_core.control import capabilities as caps_mod
from mig_core.control import parameters as params_mod
from mig_core.control import tls as tls_policy
from mig_core.control.advice import Advisor, verdict
from mig_core.control.autopilot import Autopilot
from mig_core.control.block_nodes import BlockNodeCommands
from mig_core.control.colo import ColoCommands
from mig_core.control.dirty_log import GlobalDirtyLog
from mig_core.control.events import EventEmitter
from mig_core.control.flight_recorder import FlightRecorder
from mig_core.control.jobs import JobRegistry
from mig_core.control.migration_commands import MigrationCommands
from mig_core.control.objects import ObjectRegistry
from mig_core.control.snapshots import IN_PROGRESS, Snapshots
from mig_core.control.status import POSTCOPY_STATES, RUNNING_STATES, Side, StatusMachine
from mig_core.engine.colo.state import ColoState
from mig_core.engine.context import EngineContext
from mig_core.engine.dirtylimit import DirtyLimiter
from mig_core.engine.dirtyrate import DirtyRateMeter
from mig_core.engine.globalstate import GlobalState
from mig_core.engine.incoming import IncomingMigration
from mig_core.engine.outgoing import OutgoingMigration
from mig_core.errors import QMPError
from mig_core.ext import replication
from mig_core.ext.transport import Listener, TransportContext, TransportRegistry
from mig_core.host import features as host_features
from mig_core.machine.machine import Machine
from mig_core.memory.ram import Backing
from mig_core.plugin.hooks import Hooks, make_plugin_manager
from mig_core.plugin.registry import PluginRegistry
from mig_core.qapi import UNSET, to_qmp
from mig_core.schema import parameters as parameter_decls
from mig_core.schema.commands import (
    ColoExitEventData,
    MigrateSetCapabilitiesArgs,
    MigrationEventData,
    MigrationPassEventData,
    UnplugPrimaryEventData,
)
from mig_core.schema.common import RunState, ShutdownCause, ShutdownEventData, StatusInfo, VersionInfo, VersionTriple
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import (
    MigrationCapabilityStatus,
    MigrationInfo,
)
from mig_core.schema.migration import MigrationStatus as S
from mig_core.version import __version__

log = structlog.get_logger("mig.manager")

#: The schema level mig implements, reported as the QEMU version in the greeting.
SCHEMA_VERSION = VersionTriple(major=9, minor=1, micro=0)

#: query-migrate members a SourceStats may leave out (None)
_OPTIONAL_SOURCE_STATS = ("downtime", "expected_downtime", "xbzrle_cache", "compression", "cpu_throttle_percentage",
                          "dirty_limit_throttle_time_per_round", "dirty_limit_ring_full_time", "vfio")
#: Destination states that query-migrate reports (QEMU's fill_destination_migration_info).
_REPORTED_INCOMING = frozenset({S.SETUP, S.CANCELLING, S.CANCELLED, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                                S.POSTCOPY_RECOVER, S.FAILED, S.COLO, S.COMPLETED})


class MigrationManager(MigrationCommands):
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
        self.hooks = Hooks(self.pm)
        self.events = EventEmitter(self.hooks)
        self.run = self.machine.run
        self.run.add_listener(self._on_runstate)
        self.source = StatusMachine(Side.SOURCE, self._on_status)
        self.destination = StatusMachine(Side.DESTINATION, self._on_status)
        self.caps: dict[C, bool] = caps_mod.defaults()
        self.params: dict[str, Any] = parameter_decls.defaults()
        self.migration_id = ""
        self.error_desc: str | None = None
        #: Seconds a TCP connection may hold unacknowledged data before it counts as dead (``mig run
        #: --tcp-user-timeout``): how long a migration over a dead link takes to fail.
        self.tcp_user_timeout: float = TransportContext.user_timeout
        self._incoming_rdma = False
        #: Set after ``quit`` has been answered; the host process exits when it sees it.
        self.quit_requested = threading.Event()
        #: Called with the reason when a running outgoing migration must stop (the engine registers it).
        self.cancel_outgoing: Callable[[], None] | None = None
        self._lock = threading.RLock()
        #: Descriptors named with ``getfd`` (``fd:NAME`` migration URIs use them).
        self.named_fds: dict[str, int] = {}
        self.transports = TransportRegistry(self.registry)
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self._listener: Listener | None = None
        #: Called as ``(error, exit_on_error)`` when an incoming migration fails; ``mig run`` exits there.
        self.on_incoming_failed: Callable[[str, bool], None] | None = None
        self.global_state = GlobalState()
        self.machine.add_device(self.global_state)
        self.dirty_rate = DirtyRateMeter(self.machine)
        self.dirty_limiter = DirtyLimiter(self.machine)
        #: Postcopy: pages the source sends after each page the destination asked for (``mig run
        #: --postcopy-prefetch``); 0 sends only the page, and the background scan continues after it.
        self.postcopy_prefetch_pages = 0
        #: Set by a QMP server that runs a monitor front: a new connection to it for a postcopy page server.
        self.front_link: Callable[[], socket.socket | None] = lambda: None
        self.jobs = JobRegistry(self.events.emit)
        #: every migration's records (x-query-migration-record; JSON lines where ``recorder.directory`` says)
        #: x-query-migration-advice; its latest advice opens the next migration's record
        self.advisor = Advisor(self)
        self.recorder = FlightRecorder(lambda side: to_qmp(self.query_migrate()), settings=self._record_settings,
                                       verdict=verdict)
        self.pm.register(self.recorder, "mig-flight-recorder")
        #: steers a migration that does not converge (x-set-migration-autopilot; off by default)
        self.autopilot = Autopilot(self)
        self.block_nodes = BlockNodeCommands(self.machine)
        #: object-add / object-del: TLS credentials and authorization objects
        self.objects = ObjectRegistry(self.registry, in_use=self._objects_in_use)
        self._tls_source_creds = self._tls_destination_creds = ""
        #: credentials and authz objects a TLS monitor serves with (for as long as it listens)
        self.monitor_objects: set[str] = set()
        self.pm.register(self.autopilot, "mig-autopilot")
        #: xen-set-global-dirty-log: a consumer of the dirty tracker while the log is on
        self.global_dirty_log = GlobalDirtyLog(self.machine)
        self.snapshots = Snapshots(self)
        #: COLO: failover status and figures, shared with the COLO thread of either side
        self.colo = ColoState(lambda mode, reason: self.events.emit("COLO_EXIT",
                                                                    ColoExitEventData(mode=mode, reason=reason)))
        self.colo_commands = ColoCommands(self.colo, lambda: self.source.state, lambda: self.destination.state,
                                          lambda: int(self.params["x-colo-compare-limit"]), lambda: self.error_desc,
                                          self.migrate_cancel)
        self.machine.blockers.running = self._what_runs
        self.machine.blockers.fail_running = self._blocked_while_running

    def _what_runs(self) -> str | None:
        """What a new migration blocker would have to stop (None: nothing runs)."""
        if self.source.state in POSTCOPY_STATES:
            return "postcopy"
        if self.source.state in RUNNING_STATES:
            return "migration"
        if self.run.state is RunState.SAVE_VM:
            return "snapshot"
        return None

    def _blocked_while_running(self, reason: str) -> None:
        out = self.outgoing
        if out is not None:
            out.fail(reason)

    def _record_settings(self) -> dict[str, Any]:
        """A flight record's ``start``: what decides how the migration goes."""
        p = self.params
        return {"downtime-limit": p["downtime-limit"], "max-bandwidth": p["max-bandwidth"],
                "avail-switchover-bandwidth": p["avail-switchover-bandwidth"],
                "capabilities": sorted(c.value for c, on in self.caps.items() if on),
                **({"advice": advice} if (advice := self.advice_for_next_migration()) is not None else {})}

    def advice_for_next_migration(self) -> dict[str, Any] | None:
        """x-query-migration-advice's latest answer, if recent enough to speak for a migration starting now."""
        return self.advisor.fresh()

    # -- notifications ---------------------------------------------------------

    def _on_status(self, side: Side, old: S, new: S) -> None:
        if self.caps[C.EVENTS]:
            self.events.emit("MIGRATION", MigrationEventData(status=new))
        self.hooks.status_changed(side, old, new, self.migration_id)

    def _on_runstate(self, old: RunState, new: RunState, running: bool) -> None:
        was_running = old is RunState.RUNNING
        if was_running and not running:
            self.events.emit("STOP")
        elif running and not was_running:
            self.events.emit("RESUME")
        self.hooks.runstate_changed(old, new, running)

    # -- capability rule context -------------------------------------------------

    @property
    def runstate(self) -> RunState:
        return self.run.state

    def incoming_started(self) -> bool:
        return self._listener is not None or self.destination.state is not S.NONE

    def incoming_rdma(self) -> bool:
        return self._incoming_rdma

    def multifd_compression(self) -> str:
        return str(self.params["multifd-compression"])

    def tls_enabled(self) -> bool:
        return tls_policy.enabled(self.params)

    def postcopy_unsupported(self) -> str | None:
        reason = host_features.postcopy_unsupported()
        if reason is not None:
            return reason
        for b in self.machine.blocks:
            if b.backing is Backing.HOST:
                return (f"RAM block '{b.name}' is a buffer of the host's own, whose pages mig can neither drop nor "
                        "fill on fault (add it with Machine.add_ram)")
            if b.backing is Backing.FILE and not host_features.missing_mode_filesystem(str(b.path)):
                return f"Host backend files need to be TMPFS or HUGETLBFS only (RAM block '{b.name}' is {b.path})"
        return None

    def background_snapshot_unsupported(self) -> str | None:
        return host_features.background_snapshot_unsupported()

    def memory_unsuitable_for_background_snapshot(self) -> bool:
        """Only memory mig maps itself, anonymous or memfd, can be write-protected synchronously."""
        return any(b.backing not in (Backing.ANONYMOUS, Backing.MEMFD) for b in self.machine.blocks)

    def replication_available(self) -> bool:
        return "colo" in self.registry.names(replication.GROUP)

    def per_vcpu_dirty_hint(self) -> str:
        return self.machine.attribution_hint

    def per_vcpu_dirty_available(self) -> bool:
        try:
            return self.machine.tracker_class().attributes_vcpus
        except (ValueError, LookupError):
            return False

    # -- QMP: machine ------------------------------------------------------------

    def query_version(self) -> VersionInfo:
        return VersionInfo(qemu=SCHEMA_VERSION, package=f"mig {__version__}")

    def query_status(self) -> StatusInfo:
        return StatusInfo(running=self.run.running, status=self.run.state)

    def stop(self) -> None:
        self.run.stop()

    def cont(self) -> None:
        if self.run.state not in (RunState.INMIGRATE, RunState.FINISH_MIGRATE):
            try:  # late-block-activate left them for now (QEMU's qmp_cont activates first)
                self.machine.activate_block_nodes()
            except OSError as e:
                raise QMPError(str(e)) from None
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
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name (the Python API allows one)
            raise QMPError(f"Could not open '{args.filename}': "
                           f"{e.strerror if isinstance(e, OSError) else 'Invalid argument'}") from None
        try:
            with f:
                for block, offset, length in pieces:
                    f.write(block.view[offset:offset + length])
        except OSError as e:  # a full disk, an I/O error (QEMU: QERR_IO_ERROR)
            log.warning("pmemsave_failed", filename=args.filename, error=e.strerror)
            raise QMPError("An IO error has occurred") from None

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
        return parameter_decls.to_struct(self.params)

    def migrate_set_parameters(self, args: Any) -> None:
        with self._lock:
            ctx = params_mod.CheckContext(caps=self.caps, registry=self.registry)
            self.params = params_mod.merge(self.params, args, ctx)
        changed = sorted(to_qmp(args))
        log.info("parameters_set", changed=changed)
        if "x-checkpoint-delay" in changed and self.source.state is S.COLO:  # QEMU: a checkpoint now
            self.colo.checkpoint_now("request")

    # -- QMP: migration status -------------------------------------------------------

    def query_migrate(self) -> MigrationInfo:
        info = MigrationInfo()
        blocked = self.machine.blockers.blocked_reasons(self.params["mode"])
        if blocked:  # whatever the state, even with no migration (QEMU)
            info.blocked_reasons = blocked
        incoming = self.destination.state
        listener = self._listener
        if listener is not None and listener.socket_addresses:
            info.socket_address = listener.socket_addresses
        if incoming in _REPORTED_INCOMING:
            info.status = incoming
            inc = self.incoming
            if incoming is S.COMPLETED and inc is not None and "blocktime_ms" in inc.postcopy_figures:
                info.postcopy_blocktime = int(inc.postcopy_figures["blocktime_ms"])
                info.postcopy_vcpu_blocktime = [int(x) for x in inc.postcopy_figures["vcpu_blocktime_ms"]]
        outgoing = self.source.state
        if outgoing is not S.NONE:
            info.status = outgoing
            out = self.outgoing
            if out is not None and outgoing not in (S.SETUP, S.FAILED, S.CANCELLED, S.WAIT_UNPLUG, S.COLO):
                s = out.stats()
                info.setup_time, info.total_time, info.ram = s.setup_time, s.total_time, s.ram
                for name in _OPTIONAL_SOURCE_STATS:  # shown only when the engine has a figure
                    value = getattr(s, name)
                    if value is not None:
                        setattr(info, name, value)
        if self.error_desc and info.status is not UNSET:
            info.error_desc = self.error_desc
        return info

    def set_error(self, error: str) -> None:
        """Store the first error of this migration (QEMU keeps the first and drops later ones)."""
        with self._lock:
            if self.error_desc is None:
                self.error_desc = error

    def migration_pass(self, number: int, dirty_bytes: int) -> None:
        if self.caps[C.EVENTS]:
            self.events.emit("MIGRATION_PASS", MigrationPassEventData(pass_=number))
        self.hooks.pass_completed(self.migration_id, number, dirty_bytes)

    def engine_context(self, side: Side) -> EngineContext:
        """The engine's whole view of this manager for one migration (see ``mig_core.engine.context``)."""
        if side is Side.SOURCE:
            caps = dict(self.caps)  # fixed for the migration: set-capabilities is refused while it runs
            return EngineContext(
                machine=self.machine, status=self.source, migration_id=self.migration_id,
                capabilities=lambda: caps, parameters=lambda: self.params, set_error=self.set_error,
                hooks=self.hooks, registry=self.registry, global_state=self.global_state,
                pass_completed=self.migration_pass, dirty_limiter=self.dirty_limiter,
                postcopy_prefetch_pages=self.postcopy_prefetch_pages, colo=self._colo_state(),
                device_unplugged=lambda device_id: self.events.emit("UNPLUG_PRIMARY",
                                                                    UnplugPrimaryEventData(device_id=device_id)))
        return EngineContext(
            machine=self.machine, status=self.destination, migration_id=self.migration_id,
            capabilities=lambda: self.caps, parameters=lambda: self.params, set_error=self.set_error,
            hooks=self.hooks, registry=self.registry, global_state=self.global_state,
            listener_closed=self._incoming_listener_closed, incoming_failed=self._incoming_failed,
            front_link=self.front_link, colo=self._colo_state(),
            recovery_tls=lambda: tls_policy.recovery_tls(self.objects, self.params, self._tls_destination_creds))

    def _colo_state(self) -> ColoState | None:
        return self.colo if self.replication_available() else None

    # -- QMP: dirty rate, dirty limit, threads ------------------------------------------

    def calc_dirty_rate(self, args: Any) -> None:
        self.dirty_rate.calc(args.calc_time, args.calc_time_unit or None,
                             None if args.sample_pages is UNSET else args.sample_pages, args.mode or None)

    def query_dirty_rate(self, args: Any) -> Any:
        return self.dirty_rate.query(args.calc_time_unit or None)

    def _dirty_limit_migration_running(self) -> bool:
        return self.source.state in RUNNING_STATES and self.caps[C.DIRTY_LIMIT]

    def set_vcpu_dirty_limit(self, args: Any) -> None:
        if self._dirty_limit_migration_running():
            raise QMPError("can't set dirty page rate limit while migration is running")
        self.dirty_limiter.set_limit(None if args.cpu_index is UNSET else args.cpu_index, args.dirty_rate)

    def cancel_vcpu_dirty_limit(self, args: Any) -> None:
        if self._dirty_limit_migration_running():
            raise QMPError("can't cancel dirty page rate limit while migration is running")
        self.dirty_limiter.cancel(None if args.cpu_index is UNSET else args.cpu_index)

    def query_vcpu_dirty_limit(self) -> Any:
        return self.dirty_limiter.query()

    def query_migrationthreads(self) -> Any:
        """The migration's threads that are alive now, with their OS thread ids."""
        from mig_core.schema.migration import MigrationThreadInfo

        candidates: list[threading.Thread] = []
        for part in (self.outgoing, self.incoming, self.dirty_limiter, self.dirty_rate):
            if part is not None:
                candidates += part.threads()
        return [MigrationThreadInfo(name=t.name, thread_id=t.native_id) for t in candidates
                if t.is_alive() and t.native_id is not None]

    # -- QMP: jobs and snapshots (control/jobs.py, control/snapshots.py) ------------------

    def parameter(self, name: str) -> Any:
        return self.params[name]

    def begin_snapshot_status(self) -> None:
        """A snapshot save reports through the source status, as QEMU's savevm: none/any → setup."""
        with self._lock:
            if self.source.state in RUNNING_STATES:
                raise QMPError(IN_PROGRESS)
            self.new_migration_id()
            self.error_desc = None
            self.source.cas(self.source.state, S.SETUP)

    def snapshot_save(self, args: Any) -> None:
        self.snapshots.save(args)

    def snapshot_load(self, args: Any) -> None:
        self.snapshots.load(args)

    def snapshot_delete(self, args: Any) -> None:
        self.snapshots.delete(args)

    def x_query_snapshots(self) -> Any:
        return self.snapshots.query()

    # -- QMP: objects (control/objects.py) -----------------------------------------------------

    def object_add(self, args: Any) -> None:
        self.objects.add(args)

    def object_del(self, args: Any) -> None:
        self.objects.delete(args.id)

    # -- QMP: block nodes and their dirty bitmaps (control/block_nodes.py) ----------------

    def block_dirty_bitmap_add(self, args: Any) -> None:
        self.block_nodes.add(args)

    def block_dirty_bitmap_remove(self, args: Any) -> None:
        self.block_nodes.remove(args)

    def block_dirty_bitmap_clear(self, args: Any) -> None:
        self.block_nodes.clear(args)

    def block_dirty_bitmap_enable(self, args: Any) -> None:
        self.block_nodes.enable(args)

    def block_dirty_bitmap_disable(self, args: Any) -> None:
        self.block_nodes.disable(args)

    def query_named_block_nodes(self, args: Any) -> Any:
        return self.block_nodes.query()

    def xen_save_devices_state(self, args: Any) -> None:
        self.snapshots.save_devices_file(args.filename, args.live is not False)

    def xen_load_devices_state(self, args: Any) -> None:
        self.snapshots.load_devices_file(args.filename)

    def xen_set_global_dirty_log(self, args: Any) -> None:
        self.global_dirty_log.set(bool(args.enable))

    def x_colo_lost_heartbeat(self) -> None:
        self.colo_commands.lost_heartbeat()

    def query_colo_status(self) -> Any:
        return self.colo_commands.status()

    def xen_set_replication(self, args: Any) -> None:
        self.colo_commands.set_replication(args)

    def query_xen_replication_status(self) -> Any:
        return self.colo_commands.replication_status()

    def xen_colo_do_checkpoint(self) -> None:
        self.colo_commands.checkpoint()

    def x_query_colo_stats(self) -> Any:
        return self.colo_commands.stats()

    def x_query_migration_record(self) -> Any:
        return self.recorder.records()

    def x_query_migration_advice(self, args: Any) -> Any:
        return self.advisor.advise(args)

    def x_set_migration_autopilot(self, args: Any) -> None:
        self.autopilot.configure(args)

    def x_query_migration_autopilot(self) -> Any:
        return self.autopilot.query()

    def query_jobs(self) -> Any:
        return self.jobs.query()

    def job_pause(self, args: Any) -> None:
        self.jobs.pause(args.id)

    def job_resume(self, args: Any) -> None:
        self.jobs.resume(args.id)

    def job_cancel(self, args: Any) -> None:
        self.jobs.cancel(args.id)

    def job_complete(self, args: Any) -> None:
        self.jobs.complete(args.id)

    def job_dismiss(self, args: Any) -> None:
        self.jobs.dismiss(args.id)

    def job_finalize(self, args: Any) -> None:
        self.jobs.finalize(args.id)

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

