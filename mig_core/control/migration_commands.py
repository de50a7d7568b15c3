"""QMP's migration commands of a host: ``migrate`` (and its resume), ``migrate-incoming``,
``migrate-continue``, ``migrate_cancel``, ``migrate-start-postcopy``, ``migrate-pause`` and
``migrate-recover``, with QEMU's checks and texts.

A mixin of ``MigrationManager`` (QMP finds commands as the manager's methods): the manager owns the
state named below, this class the rules for starting, steering and ending a migration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from mig_core.control import addresses
from mig_core.control import parameters as params_mod
from mig_core.control import tls as tls_policy
from mig_core.control.objects import ObjectRegistry
from mig_core.control.status import POSTCOPY_STATES, RUNNING_STATES, Side, StatusMachine
from mig_core.engine.context import EngineContext
from mig_core.engine.incoming import IncomingMigration
from mig_core.engine.outgoing import OutgoingMigration
from mig_core.errors import QMPError
from mig_core.ext.transport import Listener, Transport, TransportContext, TransportRegistry
from mig_core.machine.machine import Machine
from mig_core.machine.runstate import RunStateMachine
from mig_core.plugin.registry import PluginRegistry
from mig_core.schema.commands import MigrateArgs, MigrateContinueArgs, MigrateIncomingArgs
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigMode, MigrationAddress, MigrationAddressType
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S

log = structlog.get_logger("mig.manager")


class MigrationCommands:
    """The migration commands; ``MigrationManager`` provides the state annotated here."""

    machine: Machine
    registry: PluginRegistry
    run: RunStateMachine
    source: StatusMachine
    destination: StatusMachine
    caps: dict[C, bool]
    params: dict[str, Any]
    error_desc: str | None
    tcp_user_timeout: float
    named_fds: dict[str, int]
    transports: TransportRegistry
    objects: ObjectRegistry
    monitor_objects: set[str]
    outgoing: OutgoingMigration | None
    incoming: IncomingMigration | None
    cancel_outgoing: Callable[[], None] | None
    on_incoming_failed: Callable[[str, bool], None] | None
    _lock: threading.RLock
    _listener: Listener | None
    _incoming_rdma: bool
    _tls_source_creds: str
    _tls_destination_creds: str

    if TYPE_CHECKING:  # the manager's own
        def tls_enabled(self) -> bool: ...
        def multifd_compression(self) -> str: ...
        def new_migration_id(self) -> str: ...
        def set_error(self, error: str) -> None: ...
        def engine_context(self, side: Side) -> EngineContext: ...

    # -- QMP: migrate --------------------------------------------------------------------

    def transport_context(self) -> TransportContext:
        """What transports get from this host: named descriptors (getfd) and the TCP user timeout."""
        return TransportContext(named_fds=self.named_fds, take_fd=self._take_fd, user_timeout=self.tcp_user_timeout)

    def _take_fd(self, name: str) -> int | None:
        with self._lock:
            return self.named_fds.pop(name, None)

    def _address(self, uri: Any, channels: Any, incoming: bool) -> tuple[type[Transport], MigrationAddress]:
        return addresses.resolve(self.transports, uri, channels, incoming)

    def _check_transport_caps(self, addr: MigrationAddress) -> None:
        addresses.check_capabilities(self.caps, addr)

    def migrate(self, args: MigrateArgs) -> None:
        cls, addr = self._address(args.uri, args.channels, incoming=False)
        self._check_transport_caps(addr)
        if args.resume is True:
            with self._lock:
                out = self.outgoing
                if self.source.state is not S.POSTCOPY_PAUSED or out is None:
                    raise QMPError("Cannot resume if there is no paused migration")
                if self.caps[C.RELEASE_RAM]:
                    raise QMPError("Postcopy recovery cannot work when release-ram capability is set")
                transport = cls(self.transport_context())
                transport.check_address(addr, incoming=False)
                if self.tls_enabled():  # the recovery's connections are TLS sessions too, with today's credentials
                    tls_policy.check(self.params, self.caps, addr)
                    transport, self._tls_source_creds = tls_policy.source_transport(self.objects, self.params,
                                                                                    transport, addr)
                self.error_desc = None
                out.resume_postcopy(transport, addr)
            return
        self.migrate_with(cls(self.transport_context()), addr)

    def migrate_with(self, transport: Transport, addr: MigrationAddress) -> None:
        """Start an outgoing migration over a transport the caller made (``migrate`` after parsing;
        also for embedders and tests with a transport of their own, e.g. ``mig_core.testing``'s loopback)."""
        cls = type(transport)
        with self._lock:
            if self.source.state in RUNNING_STATES:
                raise QMPError("There's a migration process in progress")
            if self.run.state is RunState.INMIGRATE:
                raise QMPError("Guest is waiting for an incoming migration")
            if self.run.state is RunState.POSTMIGRATE:
                raise QMPError("Can't migrate the vm that was paused due to previous migration")
            self.machine.start_tracking()  # a machine no tracker can serve is blocked now, with the reason
            blocked = self.machine.blockers.error(self.params["mode"])
            if blocked is not None:
                raise QMPError(blocked)
            if self.caps[C.MAPPED_RAM] and self.tls_enabled():
                raise QMPError("Cannot use TLS with mapped-ram")
            if self.caps[C.MAPPED_RAM] and self.multifd_compression() != "none":
                raise QMPError("Cannot use compression with mapped-ram")
            if self.params["mode"] is not MigMode.NORMAL:  # QEMU's CPR rules
                if self.caps[C.POSTCOPY_RAM] or self.caps[C.DIRTY_BITMAPS]:
                    raise QMPError("Cannot use postcopy with CPR")
                if self.caps[C.BACKGROUND_SNAPSHOT]:
                    raise QMPError("Cannot use background snapshot with CPR")
                if self.caps[C.X_COLO]:
                    raise QMPError("Cannot use COLO with CPR")
            if self.caps[C.X_COLO] and self.machine.block_nodes:
                raise QMPError(f"mig cannot replicate block nodes with COLO yet (node "
                               f"'{next(iter(self.machine.block_nodes))}')")
            if self.caps[C.XBZRLE]:
                self._check_xbzrle_cache()
            if self.caps[C.MULTIFD]:  # the plugin may have gone since migrate-set-parameters
                params_mod.check_compression(self.multifd_compression(),
                                             params_mod.CheckContext(caps=self.caps, registry=self.registry))
            tls_policy.check(self.params, self.caps, addr)
            transport.check_address(addr, incoming=False)
            self.new_migration_id()
            self.error_desc = None
            tls_error, self._tls_source_creds = None, ""
            if self.tls_enabled():  # QEMU: credentials are looked up once the migration runs, and fail it
                try:
                    transport, self._tls_source_creds = tls_policy.source_transport(self.objects, self.params,
                                                                                    transport, addr)
                except QMPError as e:
                    tls_error = e.desc
            out = OutgoingMigration(self.engine_context(Side.SOURCE), transport, addr)
            self.outgoing = out
            self.cancel_outgoing = out.cancel
            self.source.cas(self.source.state, S.SETUP)
            if tls_error is not None:
                self.set_error(tls_error)
                self.source.cas(S.SETUP, S.FAILED)
                return
            # with TLS the handshake waits on the peer: the migration thread connects
            if cls.connects_synchronously and not self.tls_enabled():
                try:
                    out.use_channel(transport.connect(addr, lambda: False))
                except QMPError as e:  # QEMU: returned to the caller and the migration fails
                    self.set_error(e.desc)
                    self.source.cas(S.SETUP, S.FAILED)
                    raise
                except Exception as e:  # a transport bug still never leaves the status in setup
                    log.exception("transport_connect_crashed", transport=cls.address_type)
                    self.set_error(f"{cls.address_type}: connect failed: {type(e).__name__}: {e}")
                    self.source.cas(S.SETUP, S.FAILED)
                    raise QMPError(self.error_desc or str(e)) from None
            out.start()

    def _objects_in_use(self) -> set[str]:
        """The credentials a running migration (either side) or a monitor holds: object-del refuses them."""
        used = set(self.monitor_objects)
        if self.source.state in RUNNING_STATES:
            used.add(self._tls_source_creds)
        if self.incoming is not None and self.destination.state in RUNNING_STATES:
            used.add(self._tls_destination_creds)
        return used - {""}

    def _check_xbzrle_cache(self) -> None:
        """A cache the host could not hold is refused before anything starts (QEMU fails in setup).

        Only slots for the RAM there is are ever allocated, so a size beyond RAM costs nothing more;
        one beyond the host's memory is a mistake all the same.
        """
        size = self.params["xbzrle-cache-size"]
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if size > host:
            raise QMPError(f"Parameter 'xbzrle-cache-size' ({size} bytes) is larger than this host's memory "
                           f"({host} bytes)")

    def migrate_continue(self, args: MigrateContinueArgs) -> None:
        state = self.source.state
        if state is not args.state:
            raise QMPError(f"Migration not in expected state: {state.value}")
        out = self.outgoing
        if state is S.PRE_SWITCHOVER and out is not None:
            out.continue_switchover()

    # -- QMP: migrate-incoming ---------------------------------------------------------------

    def migrate_incoming(self, args: MigrateIncomingArgs) -> None:
        with self._lock:
            if self.incoming is not None or self.destination.state is not S.NONE:
                raise QMPError("The incoming migration has already been started")
            if self.run.state is not RunState.INMIGRATE:
                raise QMPError("'-incoming' was not specified on the command line")
            cls, addr = self._address(args.uri, args.channels, incoming=True)
            self._check_transport_caps(addr)
            self._start_incoming(cls(self.transport_context()), addr, args.exit_on_error is not False)

    def migrate_incoming_with(self, transport: Transport, addr: MigrationAddress, exit_on_error: bool = True) -> None:
        """Wait for an incoming migration over a transport the caller made (see ``migrate_with``)."""
        with self._lock:
            if self.incoming is not None or self.destination.state is not S.NONE:
                raise QMPError("The incoming migration has already been started")
            if self.run.state is not RunState.INMIGRATE:
                raise QMPError("'-incoming' was not specified on the command line")
            self._start_incoming(transport, addr, exit_on_error)

    def _start_incoming(self, transport: Transport, addr: MigrationAddress, exit_on_error: bool) -> None:
        with self._lock:
            transport.check_address(addr, incoming=True)
            tls_policy.check(self.params, self.caps, addr)
            creds = tls_policy.server_credentials(self.objects, self.params)
            listener = transport.listen(addr)
            self._tls_destination_creds = creds.creds_id if creds is not None else ""
            if creds is not None:
                listener = tls_policy.destination_listener(self.objects, self.params, self.caps, creds, listener)
            self._listener = listener
            self._incoming_rdma = addr.tag is MigrationAddressType.RDMA
            self.new_migration_id()
            self.error_desc = None
            self.destination.cas(S.NONE, S.SETUP)
            self.incoming = IncomingMigration(self.engine_context(Side.DESTINATION), listener, exit_on_error)
            self.incoming.start()


    # -- QMP: cancel and postcopy's controls ------------------------------------------------

    def _incoming_listener_closed(self) -> None:
        self._listener = None

    def _incoming_failed(self, error: str, exit_on_error: bool) -> None:
        cb = self.on_incoming_failed
        if cb is not None:
            cb(error, exit_on_error)

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
        out = self.outgoing
        if out is not None and not out.started:
            self.source.cas(S.CANCELLING, S.CANCELLED)  # cancelled before its thread started

    def migrate_start_postcopy(self) -> None:
        """Switch the running migration to postcopy at its next batch (QEMU's checks and texts)."""
        with self._lock:
            if not (self.caps[C.POSTCOPY_RAM] or self.caps[C.DIRTY_BITMAPS]):
                raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
            if self.source.state is S.NONE:
                raise QMPError("Postcopy must be started after migration has been started")
            out = self.outgoing
        if out is not None and self.source.state in RUNNING_STATES:
            out.start_postcopy()  # after the end (completed, failed, cancelled) it does nothing, as QEMU

    def migrate_pause(self) -> None:
        """Break a running postcopy's connection on purpose: both sides wait in postcopy-paused (OOB-capable)."""
        alive = (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER)
        out, inc = self.outgoing, self.incoming
        if self.source.state in alive and out is not None:
            out.pause_postcopy()
            return
        if self.destination.state in alive and inc is not None and inc.postcopy is not None:
            error = inc.postcopy.request("pause")
            if error is not None:
                raise QMPError(error)
            return
        raise QMPError("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

    def migrate_recover(self, args: Any) -> None:
        """On a paused postcopy destination: listen at ``uri`` for the source's ``migrate resume=true``."""
        inc = self.incoming
        if self.destination.state is not S.POSTCOPY_PAUSED or inc is None or inc.postcopy is None:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        self.error_desc = None
        error = inc.postcopy.request("recover", uri=args.uri)
        if error is not None:
            raise QMPError(error)

