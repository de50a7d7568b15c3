"""The postcopy page server: a helper process that fills the destination's missing pages.

It holds a duplicate of each RAM block's userfaultfd (the host keeps its own, so
a page server that dies leaves faulting threads waiting rather than reading
zeros) and, after the switch, the migration connection. Three threads, none of
which ever touches the host's memory, so none can be stopped by a fault:

* ``mig/pc/stream`` reads the rest of the stream and places each page with
  UFFDIO_COPY (UFFDIO_ZEROPAGE for zero pages), which wakes whoever waits on it;
* ``mig/pc/faults`` reads fault events: a page that is coming becomes a page
  request on the return path, a page the source never had is mapped as zero, a
  page placed meanwhile is woken;
* the main thread talks to the host (``ipc``): return-path messages the host
  asks it to send, the end of the stream, failures, and the status it moves
  through (``postcopy-paused`` when the connection breaks, ``postcopy-recover``
  and back to ``postcopy-active`` after ``migrate-recover``).

A broken connection pauses: faulting threads keep waiting, their requests are
remembered. ``recover URI`` listens there; the source's new connection sends
RECV_BITMAP per block (answered with the pages this host holds) and
POSTCOPY_RESUME (answered with RESUME_ACK, then every outstanding request again).

Run as ``python -m mig_core.engine.postcopy.page_server CONTROL_FD``.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from mig_core.engine.postcopy.blocktime import BlocktimeMeter
from mig_core.engine.postcopy.ipc import SWITCH_INTERVAL_S, ControlClosed, ControlConnection
from mig_core.engine.return_path import DestinationReturnPath, ReceivedBitmap, RequestPages, ResumeAck
from mig_core.engine.tls import TlsListener
from mig_core.errors import MigError, QMPError
from mig_core.ext.authz import AuthzCheck
from mig_core.ext.channel import Channel, ChannelError, SocketChannel
from mig_core.ext.channel_security import from_description
from mig_core.ext.transport import Listener, TransportContext, TransportRegistry
from mig_core.host.uffd import UFFD_EVENT_PAGEFAULT, UFFD_MSG, PageFiller
from mig_core.logconfig import configure_logging
from mig_core.memory.ram import RAMBlock
from mig_core.plugin.registry import PluginRegistry
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.format import Command
from mig_core.stream.placement import PagePlacer
from mig_core.stream.reader import CommandReceived, End, PagesReceived, StreamError, StreamReader

log = structlog.get_logger("mig.postcopy.page_server")

#: Fault events read per read() (32 bytes each).
_EVENTS_PER_READ = 128


@dataclass(eq=False)
class BlockState:
    """One block of the host as the page server sees it: where it is, what is there, what is coming."""

    block: RAMBlock
    address: int
    filler: PageFiller
    uffd: int
    #: pages present in the host's memory (received before the switch, or placed since)
    placed: np.ndarray
    #: pages the source still sends (everything else it never had: zero)
    coming: np.ndarray
    requested: np.ndarray = field(init=False)
    #: pages a vCPU waits on (postcopy-blocktime)
    waited: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.requested = np.zeros(self.block.npages, dtype=bool)
        self.waited = np.zeros(self.block.npages, dtype=bool)


def _segments(pages: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) positions in ``pages`` of runs that are consecutive both as pages and as rows."""
    if not len(pages):
        return []
    brk = np.flatnonzero((np.diff(pages) != 1) | (np.diff(rows) != 1)) + 1
    starts = np.concatenate(([0], brk)).tolist()
    ends = np.concatenate((brk, [len(pages)])).tolist()
    return list(zip(starts, ends, strict=True))


class UffdPlacer(PagePlacer):
    """Places received pages into the host's memory through its userfaultfds (atomically, waking waiters)."""

    reads_back = False

    def __init__(self, states: Sequence[BlockState], lock: threading.Lock,
                 blocktime: BlocktimeMeter | None = None) -> None:
        super().__init__([s.block for s in states])
        self.states = {s.block.name: s for s in states}
        self.lock = lock
        self.blocktime = blocktime
        #: requested pages not placed yet -> when they were asked for; service times (ns) of those placed
        self.asked: dict[tuple[str, int], int] = {}
        self.service_ns: list[int] = []
        #: pages of ``coming`` not placed yet (0: every page the source had has arrived)
        self.left = sum(int((s.coming & ~s.placed).sum()) for s in states)

    def _todo(self, st: BlockState, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(~st.placed[pages])
        return pages[rows], rows

    def _placed(self, st: BlockState, pages: np.ndarray) -> None:
        self.left -= int((st.coming[pages] & ~st.placed[pages]).sum())
        st.placed[pages] = True
        if self.blocktime is not None:
            waited = pages[st.waited[pages]]  # the batch's own pages only: no scan of the block
            for page in waited.tolist():
                self.blocktime.placed(st.block.name, page)
            st.waited[waited] = False

    def place(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> None:
        assert data is not None  # no direct view: every batch is staged in this process
        st, ps = self.states[block.name], block.page_size
        if len(pages) == 1:  # a requested page: the short path (no array work)
            page = int(pages[0])
            with self.lock:
                if not st.placed[page]:
                    st.filler.copy(st.address + page * ps, int(data.ctypes.data), ps)
                    if st.coming[page]:
                        self.left -= 1
                    st.placed[page] = True
                    if self.blocktime is not None and st.waited[page]:
                        self.blocktime.placed(block.name, page)
                        st.waited[page] = False
                    t0 = self.asked.pop((block.name, page), None)
                    if t0 is not None:
                        self.service_ns.append(time.monotonic_ns() - t0)
            return
        with self.lock:
            todo, rows = self._todo(st, pages)
            base = int(data.ctypes.data)
            for first, end in _segments(todo, rows):
                st.filler.copy(st.address + int(todo[first]) * ps, base + int(rows[first]) * ps, (end - first) * ps)
            self._placed(st, todo)

    def place_zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        st, ps = self.states[block.name], block.page_size
        with self.lock:
            todo, rows = self._todo(st, np.sort(pages))
            for first, end in _segments(todo, np.arange(len(todo))):
                st.filler.zeropage(st.address + int(todo[first]) * ps, (end - first) * ps)
            self._placed(st, todo)


ACTIVE, PAUSED, RECOVER = "postcopy-active", "postcopy-paused", "postcopy-recover"
#: Faults on one page after it was placed before it counts as lost (a few are duplicates of one fault).
REWAKE_LIMIT = 10_000


class PageServer:
    """The helper's state and threads (see the module docstring)."""

    def __init__(self, ctl: ControlConnection, front: ControlConnection | None = None) -> None:
        self.ctl = ctl
        #: whoever hears the status: the host and, if it has one, its monitor front (which also sends requests)
        self.peers: list[ControlConnection] = [ctl] + ([front] if front is not None else [])
        self.front = front
        self._request_lock = threading.Lock()
        self.lock = threading.Lock()
        self.states: list[BlockState] = []
        self.placer: UffdPlacer | None = None
        self.rp: DestinationReturnPath | None = None
        self.channel: Channel | None = None
        self.preempt: Channel | None = None
        self.preempt_enabled = False
        self.source_uuid = ""
        self.status = ACTIVE
        self.faults = 0
        self.requests = 0
        self.zero_filled = 0
        self.blocktime: BlocktimeMeter | None = None
        #: the destination's TLS for migrate-recover (credentials described, tls-authz), None: plain
        self.recovery_tls: dict[str, Any] | None = None
        self._listener: Listener | None = None
        self._finished = False
        self._stop_r, self._stop_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._rewakes: dict[tuple[str, int], int] = {}

    # -- control ---------------------------------------------------------------------

    def run(self) -> int:
        self.ctl.send({"op": "ready", "pid": os.getpid()})
        if self.front is not None:
            threading.Thread(target=self._serve_front, args=(self.front,), name="mig/pc/front", daemon=True).start()
        try:
            while True:
                msg, fds = self.ctl.recv()
                op = msg["op"]
                if op == "listen":
                    self._listen(msg, fds)
                elif op == "rp":
                    rp = self.rp
                    if rp is not None:
                        try:
                            rp.send_raw(Command(msg["command"]), msg.get("argument"))
                        except ChannelError as e:  # the connection broke: the stream thread pauses
                            log.warning("return_path_send_failed", error=str(e))
                elif op in ("recover", "pause"):
                    self._request(self.ctl, msg)
                elif op == "exit":
                    return 0
                else:
                    log.error("page_server_unknown_op", op=op)
                    return 2
        except ControlClosed as e:
            # the host is gone (it exited, or died): its memory went with it, nothing is left to serve
            log.info("page_server_host_gone", reason=str(e))
            return 0
        except (ChannelError, OSError) as e:
            self._report_failure(f"postcopy page server: {e}")
            return 1
        finally:
            self._finished = True
            os.write(self._stop_w, b"x")
            if self._listener is not None:
                self._listener.close()
            if self.channel is not None:
                self.channel.abort("page server exiting")
            for t in self._threads:
                t.join(2)

    def _serve_front(self, front: ControlConnection) -> None:
        """Requests from the monitor front (it answers migrate-recover/migrate-pause while the host cannot)."""
        try:
            while True:
                msg, _ = front.recv()
                if msg["op"] in ("recover", "pause"):
                    self._request(front, msg)
        except ControlClosed:
            pass

    def _request(self, peer: ControlConnection, msg: dict[str, Any]) -> None:
        """migrate-recover / migrate-pause on this destination: answer ``{"op": "reply", "id", "error"}``."""
        try:
            with self._request_lock:
                if msg["op"] == "recover":
                    self.recover(str(msg["uri"]))
                else:
                    self.pause_by_user()
            error = None
        except QMPError as e:
            error = e.desc
        except (MigError, OSError) as e:
            error = str(e)
        peer.send({"op": "reply", "id": msg.get("id"), "error": error})

    def _notify(self, msg: dict[str, Any]) -> None:
        for peer in list(self.peers):
            try:
                peer.send(msg)
            except (ControlClosed, OSError):
                if peer is not self.ctl:
                    self.peers.remove(peer)

    def _set_status(self, new: str, error: str | None = None) -> None:
        old, self.status = self.status, new
        log.info("postcopy_status", old=old, new=new, error=error)
        self._notify({"op": "status", "state": new, "error": error})

    def _listen(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Take over the connection and the userfaultfds; start placing pages and serving faults."""
        preempt_buffered = msg.get("preempt")
        self.preempt_enabled = preempt_buffered is not None
        chan_fd, uffds = fds[0], fds[1:]
        preempt_fd = -1
        if self.preempt_enabled:
            preempt_fd, uffds = uffds[0], uffds[1:]
        blocks = msg["blocks"]
        if len(uffds) != len(blocks):
            raise MigError(f"listen: {len(blocks)} blocks but {len(uffds)} userfaultfds")
        for (name, size, page_size, address, placed, coming), fd in zip(blocks, uffds, strict=True):
            block = RAMBlock.geometry(name, size, page_size)
            n = block.npages
            self.states.append(BlockState(
                block, address, PageFiller(fd), fd,
                np.unpackbits(np.frombuffer(placed, np.uint8), count=n).astype(bool),
                np.unpackbits(np.frombuffer(coming, np.uint8), count=n).astype(bool)))
        tids = msg.get("blocktime_vcpus")
        self.blocktime = BlocktimeMeter(tids) if tids is not None else None
        self.placer = UffdPlacer(self.states, self.lock, self.blocktime)
        self.source_uuid = str(msg["source_uuid"])
        self.recovery_tls = msg.get("tls")
        channel = SocketChannel(socket.socket(fileno=chan_fd))
        channel.preload(msg["buffered"])
        reader = StreamReader.continuing(channel, [s.block for s in self.states], self.placer)
        self._use(channel)
        log.info("page_server_listening", blocks=len(self.states), pages_coming=self.placer.left)
        # active before any thread runs: a connection that is already broken pauses it, never the reverse
        self._set_status(ACTIVE)
        faults = threading.Thread(target=self._serve_faults, name="mig/pc/faults", daemon=True)
        self._threads.append(faults)
        faults.start()
        if self.preempt_enabled:
            preempt = SocketChannel(socket.socket(fileno=preempt_fd))
            preempt.preload(preempt_buffered or b"")
            self._start_preempt(preempt)
        self._start_stream(reader)

    def _use(self, channel: Channel) -> None:
        self.channel = channel
        self.rp = DestinationReturnPath(channel)

    def _start_stream(self, reader: StreamReader) -> None:
        t = threading.Thread(target=self._stream, args=(reader,), name="mig/pc/stream", daemon=True)
        self._threads.append(t)
        t.start()

    def _start_preempt(self, channel: Channel) -> None:
        assert self.placer is not None
        self.preempt = channel
        reader = StreamReader.continuing(channel, [s.block for s in self.states], self.placer)
        t = threading.Thread(target=self._preempt_stream, args=(reader,), name="mig/pc/preempt", daemon=True)
        self._threads.append(t)
        t.start()

    def _preempt_stream(self, reader: StreamReader) -> None:
        """Requested pages on their own connection (postcopy-preempt): they overtake the background stream."""
        channel = reader.channel
        try:
            while True:
                item = reader.next()
                if isinstance(item, End):
                    return  # the source sent the last page it was asked for
                if not isinstance(item, PagesReceived):
                    raise StreamError(f"unexpected {type(item).__name__} on the postcopy-preempt connection")
        except (StreamError, ChannelError, OSError) as e:
            if not self._finished and self.status in (ACTIVE, RECOVER) and self.preempt is channel:
                main = self.channel
                if main is not None:  # the main stream's thread pauses (one pause, one reason)
                    log.warning("postcopy_preempt_broken", error=str(e))
                    main.abort(f"the postcopy-preempt connection broke: {e}")

    def _report_failure(self, error: str) -> None:
        log.error("page_server_failed", error=error)
        self._notify({"op": "failed", "error": error})

    # -- the stream -------------------------------------------------------------------

    def _stream(self, reader: StreamReader) -> None:
        assert self.placer is not None
        channel = reader.channel
        t0 = time.monotonic()
        try:
            while True:
                item = reader.next()
                if isinstance(item, PagesReceived):
                    continue
                if isinstance(item, End):
                    break
                if isinstance(item, CommandReceived) and item.command is Command.PING:
                    continue  # no answer is due: the source pings only before the switch
                raise StreamError(f"unexpected {type(item).__name__} in the postcopy stream")
        except (StreamError, ChannelError, OSError) as e:
            if not self._finished:
                self._pause(channel, f"postcopy: the connection to the source broke ({e}); the pages still missing "
                                     "can only come from the source, so this machine cannot complete without it: "
                                     "recover with migrate-recover")
            return
        if self.placer.left:
            missing = [f"{s.block.name}: {int((s.coming & ~s.placed).sum())}" for s in self.states]
            self._report_failure(f"postcopy: the stream ended with pages still missing ({', '.join(missing)})")
            return
        served = np.array(self.placer.service_ns or [0]) / 1000
        log.info("page_server_complete", seconds=round(time.monotonic() - t0, 3), faults=self.faults,
                 requests=self.requests, zero_filled=self.zero_filled,
                 request_to_page_us_median=round(float(np.median(served)), 1),
                 request_to_page_us_p99=round(float(np.percentile(served, 99)), 1))
        self._notify({"op": "complete", "faults": self.faults, "requests": self.requests,
                      **(self.blocktime.report() if self.blocktime is not None else {})})

    # -- pause and recovery ---------------------------------------------------------------

    def _pause(self, channel: Channel, error: str) -> None:
        """The connection broke (or the user paused): keep every waiter waiting until a recovery."""
        with self.lock:
            current = self.channel is channel
            if current:
                self.rp = None
                preempt, self.preempt = self.preempt, None
        channel.abort("postcopy paused")
        channel.close()
        if not current:  # a connection a recovery already replaced: the one in use goes on
            log.info("postcopy_stale_connection_closed", error=error)
            return
        if preempt is not None:
            preempt.abort("postcopy paused")
            preempt.close()
        log.warning("postcopy_paused", error=error)
        self._set_status(PAUSED, error)

    def pause_by_user(self) -> None:
        """migrate-pause: shut the connection; the stream thread then pauses."""
        if self.status not in (ACTIVE, RECOVER) or self.channel is None:
            raise QMPError("migrate-pause is currently only supported during postcopy-active or postcopy-recover "
                           "state")
        self.channel.abort("Postcopy migration is paused by the user")

    def recover(self, uri: str) -> None:
        """migrate-recover: listen at ``uri`` for the source's new connection (QEMU's checks)."""
        if self.status != PAUSED:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        if self._listener is not None:
            self._listener.close()  # a previous migrate-recover's listener is released first
            self._listener = None
        registry = PluginRegistry.from_environment()
        transports = TransportRegistry(registry)
        cls, addr = transports.parse(uri)
        transport = cls(TransportContext(named_fds={}, take_fd=lambda name: None))
        transport.check_address(addr, incoming=True)
        tls = self.recovery_tls
        creds = None
        if tls is not None:  # loaded before listening: credentials that no longer load fail the command
            try:
                creds = from_description(registry, tls["creds"])
            except ValueError as e:
                raise QMPError(f"migrate-recover cannot use the TLS credentials: {e}") from None
        listener = transport.listen(addr)
        if creds is not None:
            assert tls is not None
            check = AuthzCheck.from_wire(tls["authz"]) if tls.get("authz") else None
            listener = TlsListener(listener, creds, lambda: check)
        self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), name="mig/pc/recover", daemon=True)
        self._threads.append(t)
        t.start()
        log.info("postcopy_recover_listening", uri=uri)

    def _accept(self, listener: Listener) -> None:
        try:
            channel = listener.accept()
        except (ChannelError, OSError, MigError) as e:
            if self._listener is listener and not self._finished:
                log.warning("postcopy_recover_accept_failed", error=str(e))
            return
        assert self.placer is not None
        reader = StreamReader(channel, [s.block for s in self.states], self.placer)
        try:
            reader.read_header()
            if reader.source_uuid != self.source_uuid:
                raise StreamError(f"a recovery connection from source {reader.source_uuid}, not "
                                  f"{self.source_uuid}")
            with self.lock:
                self._use(channel)
            self._set_status(RECOVER)
            self._handshake(reader, listener)
        except (StreamError, ChannelError, OSError, MigError) as e:
            self._pause(channel, f"postcopy recovery: {e}")
            return
        finally:
            listener.close()
            if self._listener is listener:
                self._listener = None
        self._start_stream(reader)

    def _handshake(self, reader: StreamReader, listener: Listener) -> None:
        """RECV_BITMAP per block, then POSTCOPY_RESUME: ack, and ask again for every page still awaited."""
        rp = self.rp
        assert rp is not None
        by_name = {s.block.name: s for s in self.states}
        while True:
            item = reader.next()
            if not isinstance(item, CommandReceived):
                raise StreamError(f"expected a recovery command, got {type(item).__name__}")
            if item.command is Command.POSTCOPY_RECV_BITMAP:
                st = by_name.get(item.argument) if isinstance(item.argument, str) else None
                if st is None:
                    raise StreamError(f"RECV_BITMAP for an unknown RAM block {item.argument!r}")
                with self.lock:
                    bitmap = np.packbits(st.placed).tobytes()
                rp.send(ReceivedBitmap(st.block.name, bitmap))
            elif item.command is Command.POSTCOPY_RESUME:
                if self.preempt_enabled:  # the source connected its new preempt connection before RESUME
                    preempt = listener.accept()
                    postcopy_wire.read_preempt_header(preempt, self.source_uuid)
                    self._start_preempt(preempt)
                break
            else:
                raise StreamError(f"unexpected command {item.command.name} during postcopy recovery")
        self._set_status(ACTIVE)
        rp.send(ResumeAck(1))
        with self.lock:
            outstanding = [(st, int(p)) for st in self.states for p in np.flatnonzero(st.requested & ~st.placed)]
        for st, page in outstanding:
            rp.send(RequestPages(st.block.name, page * st.block.page_size, st.block.page_size))
        log.info("postcopy_resumed", outstanding_requests=len(outstanding))

    # -- faults ------------------------------------------------------------------------

    def _serve_faults(self) -> None:
        poller = select.poll()
        by_fd = {s.uffd: s for s in self.states}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                for fd, _ev in poller.poll():
                    if fd == self._stop_r:
                        return
                    try:
                        data = os.read(fd, UFFD_MSG.size * _EVENTS_PER_READ)
                    except BlockingIOError:
                        continue
                    st = by_fd[fd]
                    for off in range(0, len(data) - UFFD_MSG.size + 1, UFFD_MSG.size):
                        event, _r1, _r2, _r3, _flags, address, tid = UFFD_MSG.unpack_from(data, off)
                        if event == UFFD_EVENT_PAGEFAULT:
                            self._fault(st, address, tid)
        except OSError as e:
            self._report_failure(f"postcopy fault service: {e}")

    def _fault(self, st: BlockState, address: int, tid: int) -> None:
        ps = st.block.page_size
        page = (address - st.address) // ps
        if not 0 <= page < st.block.npages:
            log.warning("fault_outside_block", block=st.block.name, address=hex(address))
            return
        at = st.address + page * ps
        request = False
        with self.lock:
            self.faults += 1
            if st.placed[page]:
                st.filler.wake(at, ps)  # placed between the fault and now: the thread only needs waking
                n = self._rewakes[(st.block.name, page)] = self._rewakes.get((st.block.name, page), 0) + 1
                if n == REWAKE_LIMIT:  # a page this server placed is missing again: never serve zeros for it
                    self._report_failure(f"postcopy: page {page} of RAM block '{st.block.name}' keeps faulting "
                                         "although it was placed: its contents were lost in this host")
            elif st.coming[page]:
                request = not st.requested[page]
                st.requested[page] = True
                if self.blocktime is not None and self.blocktime.fault(st.block.name, page, tid):
                    st.waited[page] = True
            else:  # the source never had this page: it is zero there
                st.filler.zeropage(at, ps)
                st.placed[page] = True
                self.zero_filled += 1
        rp = self.rp
        if request and rp is not None:  # paused: the request is sent again after the recovery
            self.requests += 1
            self.placer.asked[(st.block.name, page)] = time.monotonic_ns()  # type: ignore[union-attr]
            try:
                rp.send(RequestPages(st.block.name, page * ps, ps))
            except ChannelError:
                pass  # the stream thread notices the broken connection and pauses


def main(argv: Sequence[str]) -> int:
    configure_logging()
    if len(argv) not in (2, 3):
        log.error("page_server_usage", usage="python -m mig_core.engine.postcopy.page_server CONTROL_FD [FRONT_FD]")
        return 2
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -15)  # serve faults before the host's own threads
    except OSError:
        pass
    # a thread that wants the GIL waits up to this long for the one holding it: the fault thread must
    # not wait 5 ms (the default) behind a page batch being placed
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    ctl = ControlConnection(socket.socket(fileno=int(argv[1])))
    front = ControlConnection(socket.socket(fileno=int(argv[2]))) if len(argv) == 3 else None
    return PageServer(ctl, front).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
