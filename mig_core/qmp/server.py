"""The QMP server: asyncio, unix and tcp sockets, several clients, in-band and out-of-band commands.

Each client gets the greeting, must negotiate with ``qmp_capabilities``, then
sends commands. In-band commands of all clients run one at a time (like QEMU's
big lock) on one worker thread, so a slow command never stalls the event loop;
``exec-oob`` commands run at once on threads of their own, never queued behind
in-band work. Events go to every negotiated client through a bounded queue per
client: a client that does not read loses events (and is told how many), never
the host's memory. A client that misbehaves or vanishes is answered with an
error or dropped; everyone else keeps being served.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from mig_core.control.events import envelope
from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.errors import QMPError, command_not_found
from mig_core.qapi import to_qmp
from mig_core.qmp.address import MonitorAddress, parse_monitor_address
from mig_core.qmp.dispatch import (
    Request,
    available_commands,
    call_manager,
    check_request,
    find_command,
    visit_arguments,
)
from mig_core.qmp.framing import MAX_NESTING, JsonInputError, JsonStreamer
from mig_core.qmp.monitor_tls import MonitorTls

log = structlog.get_logger("mig.qmp")

#: In-band requests a client may have queued before its reads pause.
MAX_QUEUED = 8
#: Bytes of replies and events waiting for one client; past it, events for that client are dropped
#: (and counted) and its requests are not read until the queue drains.
MAX_OUTPUT_BYTES = 1 << 20
#: Clients one host serves at once; a further connection is closed at once (logged), nothing else changes.
MAX_CLIENTS = 64
#: Threads that run out-of-band commands (never shared with in-band work).
OOB_THREADS = 4
#: The event that tells a client how many events it lost (mig's extension, docs/differences.md).
EVENTS_DROPPED = "MIG_EVENTS_DROPPED"


def _wire(msg: dict[str, Any]) -> bytes:
    """One QMP message as it goes on the socket."""
    return json.dumps(msg).encode() + b"\r\n"


def _has_nul(text: bytes, obj: Any) -> bool:
    """Whether any string in a parsed request (keys included) holds U+0000.

    Raw NUL bytes never reach here (the streamer refuses them), so only an escape can make one: the
    walk runs only for the rare text that has ``\\u0000`` at all.
    """
    if b"\\u0000" not in text:
        return False
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            if "\0" in o:
                return True
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return False


def _loads(text: bytes) -> Any:
    """json.loads, also for values nested up to QEMU's limit (beyond the interpreter's recursion limit)."""
    try:
        return json.loads(text)
    except RecursionError:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, MAX_NESTING * 2 + 200))
        try:
            return json.loads(text)
        finally:
            sys.setrecursionlimit(old)


class QMPSession:
    """One client connection."""

    def __init__(self, server: QMPServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.negotiated = False
        self.oob = False
        self.queue: asyncio.Queue[Request] = asyncio.Queue(MAX_QUEUED)
        self.closed = False
        self.task: asyncio.Task[Any] | None = None
        self.worker: asyncio.Task[Any] | None = None
        self.fds: list[int] = []
        self.peer = sock.getpeername() or sock.getsockname()
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._out_ready = asyncio.Event()
        self._out_room = asyncio.Event()
        self._out_room.set()
        self._dropped = 0
        self._idle = asyncio.Event()  # nothing queued and nothing being written
        self._idle.set()
        self.writer: asyncio.Task[Any] | None = None

    # -- output ------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self._idle.clear()
        self._out_ready.set()
        if self._out_bytes > MAX_OUTPUT_BYTES:
            self._out_room.clear()

    async def send(self, msg: dict[str, Any]) -> None:
        """Queue a reply (replies are never dropped; a client's reads pause while its queue is full)."""
        if not self.closed:
            self._queue(_wire(msg))

    def post_event(self, data: bytes) -> None:
        """Queue an event, or drop it (counted) while this client's queue is full."""
        if self.closed:
            return
        if self._out_bytes > MAX_OUTPUT_BYTES:
            if not self._dropped:
                log.warning("qmp_events_dropped", peer=str(self.peer), queued_bytes=self._out_bytes)
            self._dropped += 1
            return
        self._queue(data)

    async def _writer(self) -> None:
        try:
            while not self.closed:
                if not self._out:
                    if self._dropped:  # the queue drained: say what was lost, once
                        n, self._dropped = self._dropped, 0
                        log.info("qmp_events_dropped_reported", peer=str(self.peer), count=n)
                        self._queue(_wire(envelope(EVENTS_DROPPED, {"count": n})))
                        continue
                    self._idle.set()
                    self._out_ready.clear()
                    await self._out_ready.wait()
                    continue
                data = self._out.popleft()
                self._out_bytes -= len(data)
                if self._out_bytes <= MAX_OUTPUT_BYTES // 2:
                    self._out_room.set()
                await self.loop.sock_sendall(self.sock, data)
        except (ConnectionError, OSError) as e:
            log.info("qmp_client_gone", peer=str(self.peer), error=str(e))
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()
        for task in (self.task, self.worker, self.writer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self._out.clear()  # what a vanished client never read is freed with it
        self._out_bytes = 0
        self._out_room.set()
        self._idle.set()

    async def reply(self, req: Request | None, result: Any = None, error: QMPError | None = None) -> None:
        msg: dict[str, Any] = {"error": error.to_qmp()} if error else {"return": result}
        if req is not None and req.has_id:
            msg["id"] = req.id
        await self.send(msg)

    # -- input ---------------------------------------------------------------------

    async def recv(self) -> bytes:
        """Next chunk of input; descriptors passed with SCM_RIGHTS (unix sockets) are kept for getfd."""
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            except (BlockingIOError, InterruptedError):
                fd = self.sock.fileno()
                fut = self.loop.create_future()

                def readable(fut: asyncio.Future[None] = fut) -> None:
                    if not fut.done():
                        fut.set_result(None)

                self.loop.add_reader(fd, readable)
                try:
                    await fut
                finally:
                    if not self.closed:
                        self.loop.remove_reader(fd)
                continue
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds.extend(fds)
            return data

    async def run(self) -> None:
        greeting = {"QMP": {"version": to_qmp(self.server.manager.query_version()), "capabilities": ["oob"]}}
        self.task = asyncio.current_task()
        self.writer = asyncio.create_task(self._writer())
        await self.send(greeting)
        self.worker = asyncio.create_task(self._worker())
        streamer = JsonStreamer()
        try:
            while not self.closed:
                await self._out_room.wait()  # a client that does not read its replies is not read either
                data = await self.recv()
                if not data:
                    break
                for item in streamer.feed(data):
                    if isinstance(item, JsonInputError):
                        await self.reply(None, error=QMPError(str(item)))
                        continue
                    await self._handle_text(item)
        except (ConnectionError, OSError) as e:
            log.info("qmp_client_gone", peer=str(self.peer), error=str(e))
        finally:
            await self.flush()
            self.close()
            self.server.sessions.discard(self)
            log.info("qmp_client_closed", peer=str(self.peer), clients=len(self.server.sessions))

    async def flush(self, timeout: float = 1.0) -> None:
        """Let queued output go out (before the connection closes; bounded: the client may not read)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def _handle_text(self, text: bytes) -> None:
        try:
            obj = _loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            await self.reply(None, error=QMPError(f"JSON parse error, {msg}"))
            return
        except RecursionError:
            await self.reply(None, error=QMPError("JSON nesting depth limit exceeded"))
            return
        req_id = obj.get("id") if isinstance(obj, dict) else None
        has_id = isinstance(obj, dict) and "id" in obj
        if _has_nul(text, obj):
            # QEMU's parser refuses U+0000 in any string; mig answers with the request's id
            await self.reply(Request("", False, req_id, has_id, {}),
                             error=QMPError("JSON parse error, \\u0000 is not supported"))
            return
        try:
            req = check_request(obj, self.oob)
        except QMPError as e:
            await self.reply(Request("", False, req_id, has_id, {}), error=e)
            return
        if req.oob:
            # Out-of-band: dispatched right away, outside the in-band lock and its thread.
            task = asyncio.create_task(self._execute(req, oob=True))
            self.server._tasks.add(task)
            task.add_done_callback(self.server._tasks.discard)
        elif not self.negotiated or req.name == "qmp_capabilities":
            await self._execute(req, oob=False)
        else:
            await self.queue.put(req)

    async def _worker(self) -> None:
        while True:
            req = await self.queue.get()
            await self._execute(req, oob=False)

    async def _execute(self, req: Request, oob: bool) -> None:
        try:
            result = await self._dispatch(req, oob)
        except QMPError as e:
            await self.reply(req, error=e)
            return
        except Exception as e:  # noqa: BLE001 - a handler bug must not kill the session
            log.exception("qmp_command_crashed", command=req.name)
            await self.reply(req, error=QMPError(f"internal error in {req.name}: {e}"))
            return
        await self.reply(req, result)
        if req.name == "quit":
            self.server.manager.quit_requested.set()
            # in a task of the server's: the session may close (the client saw the reply) meanwhile
            task = asyncio.create_task(self._shutdown_after_reply())
            self.server._tasks.add(task)

    async def _shutdown_after_reply(self) -> None:
        await self.flush()
        self.server.shutdown()

    async def _dispatch(self, req: Request, oob: bool) -> Any:
        manager = self.server.manager
        if not self.negotiated:
            if req.name != "qmp_capabilities":
                raise command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")
            args = visit_arguments(find_command(manager, req), req.arguments)
            self.oob = any(c.value == "oob" for c in (args.enable or [])) if args.enable else False
            self.negotiated = True
            self.server.on_negotiated(self)
            return {}
        if req.name == "qmp_capabilities":
            raise command_not_found("Capabilities negotiation is already complete, command ignored")
        cmd = find_command(manager, req)
        args = visit_arguments(cmd, req.arguments)
        if cmd.name == "query-commands":
            return [{"name": c.name} for c in available_commands(manager)]
        extra = {"session_fds": self.fds} if cmd.name in ("getfd", "closefd") else None
        if oob:
            return await self.loop.run_in_executor(self.server.oob_executor, call_manager, manager, cmd, args,
                                                   extra)
        return await self.loop.run_in_executor(self.server.inband_executor, self.server.run_locked, call_manager,
                                               manager, cmd, args, extra)


class QMPServer:
    """Serves QMP for one ``MigrationManager`` on any number of unix/tcp addresses."""

    def __init__(self, manager: Any, front: bool = False) -> None:
        """``front``: serve clients through a monitor front process (mig_core.qmp.front), which keeps
        answering a postcopy's commands while this process is stopped by a page fault."""
        self.manager = manager
        self.front = front
        self._front_proc: subprocess.Popen[bytes] | None = None
        self._front_ctl: ControlConnection | None = None
        self.sessions: set[QMPSession] = set()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._big_lock = threading.Lock()
        #: in-band commands run here, one at a time: waiting for the big lock never takes a thread
        #: from out-of-band commands, which have their own
        self.inband_executor = ThreadPoolExecutor(1, thread_name_prefix="qmp-inband")
        self.oob_executor = ThreadPoolExecutor(OOB_THREADS, thread_name_prefix="qmp-oob")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._unix_paths: list[Path] = []
        #: per listener, in the order they were opened: its TLS (None: plain); the front names it by index
        self._tls: list[MonitorTls | None] = []
        manager.events.subscribe(self._on_event)

    def run_locked(self, fn: Any, *args: Any) -> Any:
        """Run an in-band command under the lock that serialises all in-band commands."""
        with self._big_lock:
            return fn(*args)

    async def listen(self, address: str | MonitorAddress) -> MonitorAddress:
        """Start listening; returns the bound address (the real port for tcp port 0)."""
        self._loop = asyncio.get_running_loop()
        addr = parse_monitor_address(address) if isinstance(address, str) else address
        tls = MonitorTls.for_address(self.manager.objects, addr)
        if addr.kind == "unix":
            path = Path(addr.path)
            if path.is_socket():
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Linux creates the file with the socket's mode less the umask: never wider than asked, so
            # nobody else can connect before the chmod that sets the mode exactly
            os.fchmod(sock.fileno(), addr.mode)
            sock.bind(str(path))
            os.chmod(path, addr.mode)
            self._unix_paths.append(path)
            bound = addr
        else:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            host, port = sock.getsockname()[:2]
            bound = MonitorAddress("tcp", host=host, port=port)
        sock.listen(16)
        sock.setblocking(False)
        index = len(self._tls)
        self._tls.append(tls)
        if tls is not None:  # object-del refuses credentials (and authz) a monitor serves with
            self.manager.monitor_objects.update(filter(None, (addr.tls_creds, addr.tls_authz)))
        if self.front:
            self._start_front().send({"op": "listener", "index": index,
                                      "tls": tls.creds.describe() if tls is not None else None}, [sock.fileno()])
            sock.close()  # the front accepts; this process gets each client over its control connection
        else:
            self._listeners.append(sock)
            self._tasks.add(asyncio.create_task(self._accept_loop(sock, tls)))
        log.info("qmp_listening", address=str(bound), front=self.front, tls=tls is not None)
        return bound

    def _start_front(self) -> ControlConnection:
        if self._front_ctl is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._front_proc = subprocess.Popen(
                    [sys.executable, "-m", "mig_core.qmp.front", str(theirs.fileno()), str(os.getpid())],
                    pass_fds=[theirs.fileno()])
            finally:
                theirs.close()
            self._front_ctl = ControlConnection(ours)
            threading.Thread(target=self._front_clients, args=(self._front_ctl,), name="qmp-front",
                             daemon=True).start()
            self.manager.front_link = self._front_link
            log.info("qmp_front_started", pid=self._front_proc.pid)
        return self._front_ctl

    def _front_clients(self, ctl: ControlConnection) -> None:
        """Each client the front accepted arrives here as one end of a socket pair."""
        try:
            while True:
                msg, fds = ctl.recv()
                if msg["op"] == "client" and fds:
                    sock = socket.socket(fileno=fds[0])
                    loop = self._loop
                    tls = self._tls[msg.get("listener", 0)] if self._tls else None
                    if loop is None or loop.is_closed() or (tls is not None and not tls.admit(msg.get("peer"))):
                        sock.close()  # the front's TLS session ended here: tls-authz is checked in this process
                        continue
                    loop.call_soon_threadsafe(self._adopt, sock)
        except ControlClosed:
            log.info("qmp_front_gone")

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        task = asyncio.create_task(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _front_link(self) -> socket.socket | None:
        """A connection from the front to a postcopy page server (the server's end is returned)."""
        ctl = self._front_ctl
        if ctl is None:
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ctl.send({"op": "page-server"}, [theirs.fileno()])
        except (ControlClosed, OSError):
            ours.close()
            return None
        finally:
            theirs.close()
        return ours

    async def _accept_loop(self, listener: socket.socket, tls: MonitorTls | None) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(listener)  # type: ignore[union-attr]
            except OSError:
                return
            conn.setblocking(False)
            task = asyncio.create_task(self._serve(conn, tls))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, tls: MonitorTls | None = None) -> None:
        if len(self.sessions) >= MAX_CLIENTS:
            log.warning("qmp_client_refused", reason="too many clients", limit=MAX_CLIENTS)
            conn.close()
            return
        if tls is not None:
            plain = await tls.accept(conn)
            if plain is None:
                return
            conn = plain
        session = QMPSession(self, conn)
        self.sessions.add(session)
        log.info("qmp_client_connected", peer=str(session.peer))
        await session.run()

    def on_negotiated(self, session: QMPSession) -> None:
        log.info("qmp_negotiated", peer=str(session.peer), oob=session.oob)

    def _on_event(self, msg: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._broadcast, msg)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        data = _wire(msg)
        for s in list(self.sessions):
            if s.negotiated and not s.closed:
                s.post_event(data)

    def shutdown(self) -> None:
        self._stopped.set()

    async def serve_until_shutdown(self) -> None:
        await self._stopped.wait()
        await self.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for sock in self._listeners:
            sock.close()
        for s in list(self.sessions):
            s.close()
        for p in self._unix_paths:
            if p.is_socket():
                p.unlink()
        self.manager.events.unsubscribe(self._on_event)
        if self._front_ctl is not None:
            self._front_ctl.sock.shutdown(socket.SHUT_RDWR)
            self._front_ctl.close()
            self._front_ctl = None
        if self._front_proc is not None:
            try:
                self._front_proc.wait(5)
            except subprocess.TimeoutExpired:
                self._front_proc.kill()
        self.inband_executor.shutdown(wait=False)
        self.oob_executor.shutdown(wait=False)
