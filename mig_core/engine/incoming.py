"""The destination side: accept the source's connection, check and load the stream, then run.

setup (listening) → active (connected, loading) → completed once everything is
loaded and the machine runs (or stays paused under ``-S``), confirmed to the
source over the return path. A bad stream fails the load with a precise
error; the host's ``on_incoming_failed`` callback decides what happens next
(``mig run`` exits with status 1 unless ``exit-on-error`` was false, as QEMU).
"""

from __future__ import annotations

import threading
import uuid as uuid_mod
from typing import TYPE_CHECKING, Any

import structlog

from mig_core.engine import dirty_bitmaps, link_probe
from mig_core.engine.announce import start_announce
from mig_core.engine.colo.secondary import ColoSecondary
from mig_core.engine.context import EngineContext
from mig_core.engine.held_pages import HeldPages, decode_runs
from mig_core.engine.link_probe import PROBE_MAGIC
from mig_core.engine.multifd_recv import MultifdReceiver
from mig_core.engine.postcopy.destination import PostcopyIncoming
from mig_core.engine.return_path import DestinationReturnPath, Loaded, Message, Pong, Shut
from mig_core.engine.switchover_ack import SwitchoverApprovals
from mig_core.errors import MigError
from mig_core.ext import compressor, replication
from mig_core.ext.channel import Channel, ChannelAborted, ChannelEOF, ChannelError
from mig_core.machine.device import DeviceSection, PendingStates
from mig_core.memory.ram import RAMBlock
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream import mapped_ram
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.checksum import FLAG_CHECKSUMS
from mig_core.stream.format import MAGIC, Command
from mig_core.stream.mapped_ram import MappedRamLayout
from mig_core.stream.multifd import MULTIFD_MAGIC, MultifdError, read_init
from mig_core.stream.placement import CopyPlacer
from mig_core.stream.reader import CommandReceived, DevicePart, End, PassEnd, StreamError, StreamReader

if TYPE_CHECKING:
    from mig_core.ext.transport import Listener

log = structlog.get_logger("mig.incoming")

_NIL_UUID = str(uuid_mod.UUID(int=0))


class IncomingMigration:
    """One incoming migration, loaded in a thread named ``mig/dst/main``."""

    def __init__(self, ctx: EngineContext, listener: Listener, exit_on_error: bool) -> None:
        self.ctx = ctx
        self.status = ctx.status
        self.machine = ctx.machine
        self.listener = listener
        self.exit_on_error = exit_on_error
        self.channel: Channel | None = None
        self._extra: dict[int, Channel] = {}
        #: link probes served while waiting (cut off when this migration ends)
        self._probes: list[Channel] = []
        self.multifd: MultifdReceiver | None = None
        self.return_path: DestinationReturnPath | None = None
        #: switchover-ack: the devices still to approve (None without the capability)
        self.switchover_approvals: SwitchoverApprovals | None = None
        #: set by the postcopy advise in CONFIG; after the switch the page server owns the connection
        self.postcopy: PostcopyIncoming | None = None
        #: the postcopy-preempt connection (this process's descriptor; the page server holds another)
        self._preempt: Channel | None = None
        #: the page server's figures at the end (faults, requests; blocktime with postcopy-blocktime)
        self.postcopy_figures: dict[str, Any] = {}
        self.announce: threading.Thread | None = None
        #: x-ignore-shared: blocks this host maps from the same file as the source (never sent, never dropped)
        self.ignored: set[str] = set()
        #: the source's CONFIG asked for COLO (x-colo): after the load this side becomes the secondary
        self.colo = False
        #: what this host's RAM held before loading (the data of pages the source never sends is dropped)
        self.held: HeldPages | None = None
        self.thread = threading.Thread(target=self._run, name="mig/dst/main", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def threads(self) -> list[threading.Thread]:
        """The threads of this incoming migration (query-migrationthreads shows those alive)."""
        out = [self.thread] + ([self.announce] if self.announce is not None else [])
        return out + (self.multifd.threads if self.multifd is not None else [])

    def stop(self) -> None:
        """Abandon the incoming migration (host shutdown)."""
        self.listener.close()
        if self.channel is not None:
            self.channel.abort("incoming migration stopped")
        if self.multifd is not None:
            self.multifd.abort("incoming migration stopped")
        for ch in list(self._extra.values()):
            ch.abort("incoming migration stopped")

    def _run(self) -> None:
        ctx = self.ctx
        try:
            # pages this host holds before loading (those the source does not send are dropped at the end);
            # read now, while waiting, not on the loading path -- except for shared files, which the kernel
            # answers for page by page (~10 ms per GiB) and which x-ignore-shared may leave out entirely
            self.held = HeldPages(self.machine.blocks, self.machine.held_runs())
            self._connect()
            if not ctx.capability(C.POSTCOPY_PREEMPT):  # else the preempt connection comes at the switch
                self.listener.close()
            ctx.listener_closed()
            self.status.cas(S.SETUP, S.ACTIVE)
            self._load()
        except (MigError, OSError) as e:  # a bad stream, a lost channel, state this host cannot take
            if isinstance(e, ChannelAborted) and self.status.state is S.SETUP:
                log.info("incoming_abandoned")
                return
            self._fail(f"load of migration failed: {e}")
        except Exception as e:  # noqa: BLE001 - a bug (numpy's included): reported as one, never a crash
            log.exception("incoming_thread_crashed")
            self._fail(f"load of migration failed: internal error: {type(e).__name__}: {e}")
        finally:
            if self.held is not None:
                self.held.stop()
            self.listener.close()  # connections still queued (e.g. multifd channels) are refused now
            if self.multifd is not None:
                self.multifd.abort("incoming migration ended")
                self.multifd.close()
            for ch in self._extra.values():
                ch.close()
            for ch in self._probes:
                ch.abort("incoming migration ended")
            if self._preempt is not None:
                self._preempt.close()
            if self.postcopy is not None:
                self.postcopy.close()
            if self.channel is not None:
                self.channel.close()  # this process's descriptor only: the page server may hold another

    def _connect(self) -> None:
        """Accept the main channel and, with multifd, multifd-channels more; check the source's config.

        Connections are told apart by their first bytes, whatever order they arrive in. The main
        stream's header and CONFIG are read as soon as it is there, so a source whose multifd
        settings differ is refused before this host waits for channels that never come.
        """
        caps = self.ctx.capabilities()
        multifd = caps[C.MULTIFD]
        want = self.ctx.parameter("multifd-channels") if multifd else 0
        self.placer = CopyPlacer(self.machine.blocks)
        uuids: dict[int, str] = {}
        while self.channel is None or len(self._extra) < want:
            ch = self.listener.accept()
            if caps[C.MAPPED_RAM]:  # a file: one stream, read by extra descriptors later
                self.channel = ch
                self.reader = StreamReader(ch, self.machine.blocks, self.placer)
                self.reader.read_header()
                break
            try:
                magic = ch.recv_exact(len(MAGIC))
            except ChannelEOF as e:
                ch.close()
                raise StreamError("Failed to peek at channel" if multifd else
                                  f"truncated stream: it ended inside the stream header ({e})") from None
            if magic == PROBE_MAGIC:  # the advisor measuring the link: served aside, the wait goes on
                self._probes.append(ch)
                link_probe.serve(ch)
                continue
            ch.read_in_bulk()  # the main stream's pages or a multifd channel's packets
            if not multifd:
                self.channel = ch
                self.reader = StreamReader(ch, self.machine.blocks, self.placer)
                self.reader.read_header(magic)
                break
            if magic == MAGIC and self.channel is None:
                self.channel = ch
                self.reader = StreamReader(ch, self.machine.blocks, self.placer)
                self.reader.read_header(magic)
                item = self.reader.next()
                if not (isinstance(item, CommandReceived) and item.command is Command.CONFIG):
                    raise StreamError("the stream must send its CONFIG right after its block list")
                self._command(item, self.reader.source_uuid)
            elif magic == MULTIFD_MAGIC:
                cid, uuid, flags = read_init(ch, magic, want, set(self._extra))
                if bool(flags & FLAG_CHECKSUMS) != caps[C.X_CHECKSUMS]:
                    raise MultifdError(f"multifd channel {cid}: {_checksums_mismatch(caps[C.X_CHECKSUMS])}")
                self._extra[cid] = ch
                uuids[cid] = uuid
            else:
                ch.close()
                raise StreamError(f"unknown channel magic: {magic!r}")
        if self.reader.checksums != caps[C.X_CHECKSUMS]:
            raise StreamError(_checksums_mismatch(caps[C.X_CHECKSUMS]))
        for cid, uuid in sorted(uuids.items()):
            if uuid != self.reader.source_uuid:
                raise MultifdError(f"failed to receive packet via multifd channel {cid}: multifd: received uuid "
                                   f"'{uuid}' and expected uuid '{self.reader.source_uuid}' for channel {cid}")
        if multifd and not caps[C.MAPPED_RAM]:
            name = str(self.ctx.parameter("multifd-compression"))
            factory = None
            if name != "none":
                page_size = min((b.page_size for b in self.machine.blocks), default=4096)
                factory = compressor.load(self.ctx.registry, name, page_size).decoder
            main = self.channel
            self.multifd = MultifdReceiver([self._extra[i] for i in range(want)], self.reader.source_blocks,
                                           self.placer, factory, lambda msg: main.abort(msg),
                                           self.reader.suspects if self.reader.checksums else None)
            self.multifd.start()

    def _load(self) -> None:
        machine = self.machine
        assert self.channel is not None
        placer, reader = self.placer, self.reader
        for dev in machine.devices:
            dev.load_setup()
        states = machine.devices.pending()  # applied only once every device's state is in and valid
        package: CommandReceived | None = None
        try:
            for item in reader:
                if isinstance(item, DeviceSection) and item.id == dirty_bitmaps.SECTION_ID:
                    self._load_bitmaps(item)
                elif isinstance(item, DeviceSection):
                    states.add(item)
                elif isinstance(item, DevicePart):
                    machine.devices.lookup(item.id, item.instance, item.version).load_iterate(item.chunk)
                elif isinstance(item, CommandReceived) and item.command is Command.PACKAGED:
                    package = item
                    self._read_package(item, states)
                    break
                elif isinstance(item, CommandReceived):
                    self._command(item, reader.source_uuid)
                elif isinstance(item, MappedRamLayout):
                    self._load_mapped_ram(item)
                elif isinstance(item, PassEnd):
                    if self.multifd is None:
                        raise StreamError(f"a multifd PASS {item.number} marker, but the stream has no multifd "
                                          "channels")
                    self.multifd.wait_sync(item.number)
                elif isinstance(item, End):
                    if self.multifd is not None:
                        self.multifd.finish()
                    corrupt = reader.suspects.remaining()
                    if corrupt is not None:  # pages that arrived corrupt and never again: do not run on them
                        raise StreamError(corrupt)
                    break
            if package is None:
                states.apply()
        finally:
            for dev in machine.devices:
                dev.load_cleanup()
        if package is not None:
            self._postcopy(package, states)
            return
        if self.postcopy is not None:  # advised, but the source completed in precopy
            self.postcopy.close()
            self.postcopy = None
        self._drop_unsent(placer)
        if self.colo:
            assert self.ctx.colo is not None
            ColoSecondary(self, self.ctx.colo).run()
            return
        self._start_machine()
        if self.return_path is not None:
            self.return_path.send(Loaded())
        self.status.cas(S.ACTIVE, S.COMPLETED)
        log.info("incoming_completed", runstate=machine.run.state.value)
        self.announce = start_announce(self.ctx.hooks, dict(self.ctx.parameters()))

    def _read_package(self, item: CommandReceived, states: PendingStates) -> None:
        """PACKAGED: read the device state that follows, whole, before the page server takes the connection."""
        if self.postcopy is None:
            raise StreamError("CMD_PACKAGED without a postcopy advise: postcopy was never advised")
        _token, count = postcopy_wire.package(item.argument)
        for _ in range(count):
            section = self.reader.next()
            if not isinstance(section, DeviceSection):
                raise StreamError(f"CMD_PACKAGED: expected device state, got {type(section).__name__}")
            if section.id == dirty_bitmaps.SECTION_ID:
                self._load_bitmaps(section)
            else:
                states.add(section)
        if self.multifd is not None:  # the source ended its multifd channels before the switch
            self.multifd.finish()

    def _postcopy(self, package: CommandReceived, states: PendingStates) -> None:
        """The switch: hand over to the page server, load the devices, run, wait for the last page."""
        pc = self.postcopy
        assert pc is not None and self.channel is not None
        token, _count = postcopy_wire.package(package.argument)
        preempt = None
        if self.ctx.capability(C.POSTCOPY_PREEMPT):  # the source connected it before it sent the package
            preempt = self._preempt = self.listener.accept()
            postcopy_wire.read_preempt_header(preempt, self.reader.source_uuid)
            self.listener.close()
        pc.on_status = self._postcopy_status
        vcpus = ([v.thread_id for v in self.machine.vcpus.vcpus] if self.ctx.capability(C.POSTCOPY_BLOCKTIME)
                 else None)
        pc.listen(self.channel, self.reader.source_blocks, self.placer.received, self.reader.source_uuid, preempt,
                  vcpus)
        self.return_path = None  # the page server writes the connection from now on
        self.status.cas(S.ACTIVE, S.POSTCOPY_ACTIVE)
        states.apply()
        self._start_machine()
        pc.send(Pong(token))
        log.info("postcopy_running", runstate=self.machine.run.state.value)
        figures = pc.wait()
        self.postcopy_figures = figures
        pc.send(Loaded())
        self.status.cas(S.POSTCOPY_ACTIVE, S.COMPLETED)
        log.info("incoming_completed", runstate=self.machine.run.state.value, postcopy=True, **figures)
        self.announce = start_announce(self.ctx.hooks, dict(self.ctx.parameters()))

    def _load_mapped_ram(self, layout: MappedRamLayout) -> None:
        """Read the RAM regions of a mapped-ram file (multifd: multifd-channels descriptors in parallel)."""
        main, caps = self.channel, self.ctx.capabilities()
        assert main is not None
        if not caps[C.MAPPED_RAM]:
            raise StreamError("the stream has a MAPPED_RAM section, but capability mapped-ram is off")
        readers: list[Channel] = [main]
        try:
            if caps[C.MULTIFD]:
                direct_io = bool(self.ctx.parameter("direct-io"))
                readers += [self.listener.open_extra(direct_io) for _ in range(self.ctx.parameter("multifd-channels"))]
                if direct_io:
                    readers = readers[1:]  # only the aligned page I/O goes through O_DIRECT descriptors
            pages = mapped_ram.load(main, readers, layout, self.reader.source_blocks, main.size(),
                                    lambda b, p: self.placer.place(b, p, None))
        except (OSError, ChannelError) as e:
            raise StreamError(str(e)) from None
        finally:
            for r in readers:
                if r is not main:
                    r.close()
        main.seek(layout.resume_offset)
        log.info("mapped_ram_loaded", pages=pages, readers=len(readers))

    def _load_bitmaps(self, section: DeviceSection) -> None:
        """The source's dirty bitmaps (capability dirty-bitmaps), placed on this host's block nodes."""
        if not self.ctx.capability(C.DIRTY_BITMAPS):
            raise StreamError("the source sends dirty bitmaps, but capability dirty-bitmaps is off here")
        dirty_bitmaps.load(section, self.machine, self.ctx.parameter("block-bitmap-mapping"))

    def _drop_unsent(self, placer: CopyPlacer) -> None:
        """Pages the source never sent are zero there: drop whatever this host held in them (``HeldPages``).

        Done at the end rather than by discarding all RAM first, so a preallocated destination keeps
        its pages for what does arrive (no page faults while loading).
        """
        assert self.held is not None  # made before anything is loaded
        early, late, dropped = self.held.drop_unsent(placer, self.ignored)
        log.info("held_pages_dropped", read_while_loading=early, read_at_end=late, dropped=dropped)

    def _command(self, item: CommandReceived, source_uuid: str) -> None:
        if item.command is Command.OPEN_RETURN_PATH:
            if self.return_path is None and self.channel is not None:
                self.return_path = DestinationReturnPath(self.channel)
                if self.ctx.capability(C.SWITCHOVER_ACK):
                    self.switchover_approvals = SwitchoverApprovals(self._tell_source)
                    self.switchover_approvals.start(self.machine.devices)
        elif item.command is Command.CONFIG:
            cfg = item.argument if isinstance(item.argument, dict) else {}
            caps = self.ctx.capabilities()
            for cap in (C.MAPPED_RAM, C.X_IGNORE_SHARED, C.MULTIFD, C.POSTCOPY_PREEMPT):
                mine = caps[cap]
                theirs = bool(cfg.get(cap.value, False))
                if mine != theirs:
                    raise StreamError(f"Capability {cap} is {'on' if mine else 'off'}, but received capability "
                                      f"is {'on' if theirs else 'off'}")
            if cfg.get(C.SWITCHOVER_ACK.value) and not caps[C.SWITCHOVER_ACK]:
                # QEMU's source would wait for an ack this host never sends: refused instead of a hang
                raise StreamError("the source waits for this host's switchover ack, but capability switchover-ack "
                                  "is off here: enable it on both sides")
            mfd = cfg.get("multifd")
            if isinstance(mfd, dict) and caps[C.MULTIFD] and not caps[C.MAPPED_RAM]:
                params = self.ctx.parameters()
                if mfd.get("channels") != params["multifd-channels"]:
                    raise StreamError(f"the source uses {mfd.get('channels')} multifd channels, this host expects "
                                      f"multifd-channels {params['multifd-channels']}")
                if mfd.get("compression") != str(params["multifd-compression"]):
                    raise StreamError(f"the source compresses with multifd-compression '{mfd.get('compression')}', "
                                      f"this host has '{params['multifd-compression']}'")
            if cfg.get("validate-uuid"):
                local = self.machine.uuid
                if local == _NIL_UUID:
                    log.warning("uuid_not_validated", reason="this host has no uuid", received=source_uuid)
                elif local != source_uuid:
                    raise StreamError(f"UUID received is {source_uuid} and local is {local}")
            if cfg.get(C.X_COLO.value):
                if not caps[C.X_COLO]:
                    raise StreamError("ENABLE_COLO command come in migration stream, but x-colo capability is not set")
                if self.ctx.colo is None or "colo" not in self.ctx.registry.names(replication.GROUP):
                    raise StreamError("ENABLE_COLO command come in migration stream, but the replication module "
                                      "is not built in")
                self.colo = True
            self.ignored = check_ignored_blocks(cfg.get("ignored-blocks") or {}, self.machine.blocks)
            advise = cfg.get("postcopy-advise")
            if advise is not None:
                # part of CONFIG, so RAM is dropped before any page can land (multifd channels start after it)
                if not self.ctx.capability(C.POSTCOPY_RAM):
                    raise StreamError("RAM postcopy is disabled but have 16 byte advise")
                postcopy_wire.check_advise(advise, self.machine.blocks)
                self.postcopy = PostcopyIncoming(self.machine.blocks, self.ctx.front_link, self.ctx.recovery_tls)
                self.postcopy.advise()
        elif item.command is Command.POSTCOPY_RAM_DISCARD:
            if self.postcopy is None:
                raise StreamError("CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (0)")
            block, starts, ends = postcopy_wire.parse_discard(item.argument, {b.name: b for b in self.machine.blocks})
            self.postcopy.discard(block, starts, ends)
        elif item.command is Command.UNPOPULATED:
            runs = decode_runs(item.argument, {b.name: b for b in self.machine.blocks})
            # with postcopy advised, RAM was dropped and may be registered for missing pages: a read there
            # would wait for the page server, so everything waits for the end (after postcopy closed)
            if self.held is not None and self.postcopy is None:
                self.held.scan_unpopulated({k: v for k, v in runs.items() if k not in self.ignored},
                                           self.placer.received)
        elif item.command is Command.PING:
            if self.return_path is not None:
                token = item.argument
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise StreamError(f"PING needs a non-negative integer token, got {token!r}")
                self.return_path.send(Pong(token))

    def _start_machine(self) -> None:
        """QEMU's rule: run if the source ran and we may autostart; -S: paused; else adopt the source's state."""
        run = self.machine.run
        source_state = self.ctx.global_state.received_runstate
        self.ctx.hooks.switchover(self.ctx.migration_id, self.status.side)
        will_run = source_state in (None, RunState.RUNNING, RunState.FINISH_MIGRATE) and run.autostart
        if will_run or not self.ctx.capability(C.LATE_BLOCK_ACTIVATE):  # late: at cont, unless it runs now
            try:
                self.machine.activate_block_nodes()
            except OSError as e:  # QEMU's rule: report it, and the machine stays stopped
                log.error("block_nodes_not_activated", error=str(e))
                run.set(RunState.PAUSED)
                return
        if source_state in (None, RunState.RUNNING, RunState.FINISH_MIGRATE):
            run.set(RunState.RUNNING if run.autostart else RunState.PAUSED)
        else:
            run.set(source_state)

    def _postcopy_status(self, state: str, error: str | None) -> None:
        """The page server paused (the connection broke), recovers, or runs again: this side's status follows."""
        new, old = S(state), self.status.state
        if error is not None and new is S.POSTCOPY_PAUSED:
            log.warning("postcopy_paused", error=error)
            self.ctx.set_error(error)
        if new is not old:
            self.status.cas(old, new)

    def _tell_source(self, msg: Message) -> None:
        """Send on the return path: this process's end, or the page server's after the switch; best effort."""
        try:
            if self.return_path is not None:
                self.return_path.send(msg)
            elif self.postcopy is not None and self.postcopy.listening:
                self.postcopy.send(msg)
        except (ChannelError, MigError):
            pass

    def _fail(self, error: str) -> None:
        self.ctx.set_error(error)
        state = self.status.state
        if state in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.COLO):
            self.status.cas(state, S.FAILED)
        self._tell_source(Shut(1))
        log.error("incoming_failed", error=error)
        self.ctx.incoming_failed(error, self.exit_on_error)


def check_ignored_blocks(ignored: object, blocks: list[RAMBlock]) -> set[str]:
    """x-ignore-shared: each block the source left out must be a shared mapping of the same file here."""
    if not isinstance(ignored, dict):
        raise StreamError(f"corrupt ignored-blocks in CONFIG: {ignored!r}")
    local = {b.name: b for b in blocks}
    for name, ident in ignored.items():
        b = local.get(name)
        if not isinstance(ident, dict) or b is None:
            raise StreamError(f"x-ignore-shared: the source left out RAM block '{name}', which this host does "
                              "not have")
        if not b.shared_file:
            raise StreamError(f"x-ignore-shared: the source maps RAM block '{name}' from {ident.get('path')}, but "
                              f"this host's block is {b.backing.value} memory: map the same file "
                              "(--ram ...,backing=file,path=P)")
        mine = b.file_identity()
        if (mine["dev"], mine["ino"]) != (ident.get("dev"), ident.get("ino")):
            raise StreamError(f"x-ignore-shared: RAM block '{name}' maps {mine['path']} here but "
                              f"{ident.get('path')} on the source: not the same file")
    return set(ignored)


def _checksums_mismatch(here: bool) -> str:
    """x-checksums must be set on both sides (as multifd must): the stream says what the source did."""
    if here:
        return "this host has x-checksums on, but the source sends no checksums (set it on both sides)"
    return "the source sends checksums (x-checksums), but this host has x-checksums off (set it on both sides)"
