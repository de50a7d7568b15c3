"""The monitor front: a process that owns a host's QMP sockets and stays up when the host cannot run.

A postcopy destination's threads fault on pages that have not arrived; one
that faults while holding the GIL stops every thread of the host, its QMP
server included, until the page comes, and during a paused postcopy it never
comes unless an operator recovers it. The front accepts every client and
relays its bytes (and passed descriptors) to the host's QMP server over a
socket pair, so in normal times it is invisible. While a postcopy runs, the
page server tells it the postcopy status, and the front answers
``query-migrate``, ``migrate-recover`` and ``migrate-pause`` itself, by asking
the page server: they work however long the host is stopped.

It also watches the page server: if that dies before every page arrived, the
machine cannot continue (pages it never received can no longer come), so the
front reports ``failed`` with the cause and, if the host has not ended itself
within a few seconds (it may be stopped by a fault), kills it.

Run as ``python -m mig_core.qmp.front CONTROL_FD HOST_PID``; listening sockets
arrive over the control connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import ssl
import sys
import threading
from typing import Any

import structlog

from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.ext.channel_security import from_description
from mig_core.logconfig import configure_logging
from mig_core.plugin.registry import PluginNotFound, PluginRegistry
from mig_core.qmp.framing import JsonInputError, JsonStreamer
from mig_core.qmp.monitor_tls import bridge

log = structlog.get_logger("mig.qmp.front")

#: Commands the front answers itself while a postcopy runs (the host may be stopped by a fault).
STAND_IN = frozenset({"query-migrate", "migrate-recover", "migrate-pause"})
#: Postcopy states in which the page server, not the host, knows the destination's status.
_POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: Seconds the host gets to end itself after its page server died, before the front kills it.
KILL_GRACE_S = 3.0


def _reply(msg: dict[str, Any], request: dict[str, Any]) -> bytes:
    if "id" in request:
        msg["id"] = request["id"]
    return json.dumps(msg).encode() + b"\r\n"


class PageServerLink:
    """The front's connection to a postcopy page server: its status, and requests to it."""

    def __init__(self, front: Front, conn: ControlConnection) -> None:
        self.front = front
        self.conn = conn
        self.status: str | None = None  # until the page server reports one (it does at the switch)
        self.error: str | None = None
        self.ended = False
        #: the page server died before the last page: the front reports ``failed`` from then on
        self.died = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str | None]] = {}
        threading.Thread(target=self._read, name="front/page-server", daemon=True).start()

    @property
    def standing_in(self) -> bool:
        """Whether the front answers for the page server now (a postcopy runs, or its page server died)."""
        return self.status in _POSTCOPY or self.died

    def _read(self) -> None:
        loop = self.front.loop
        try:
            while True:
                msg, _ = self.conn.recv()
                loop.call_soon_threadsafe(self._on_message, msg)
        except ControlClosed:
            loop.call_soon_threadsafe(self._on_closed)

    def _on_message(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "status":
            self.status, self.error = str(msg["state"]), msg.get("error") or self.error
        elif op == "reply":
            fut = self._waiting.pop(int(msg.get("id") or 0), None)
            if fut is not None and not fut.done():
                fut.set_result(msg.get("error"))
        elif op == "complete":
            self.status, self.ended = "completed", True
        elif op == "failed":
            self.status, self.error = "failed", str(msg.get("error"))

    def _on_closed(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result("the postcopy page server is gone")
        self._waiting.clear()
        if self.ended:
            return
        self.ended = True
        if self.status in _POSTCOPY:
            self.status, self.died = "failed", True
            self.error = ("the postcopy page server died before every page arrived; those pages cannot arrive "
                          "any more and this machine cannot continue")
            log.error("page_server_died", host_pid=self.front.host_pid, error=self.error)
            self.front.loop.call_later(KILL_GRACE_S, self.front.kill_host)

    async def request(self, op: str, **args: Any) -> str | None:
        if self.ended:
            return "the postcopy page server is gone"
        rid = next(self._ids)
        fut: asyncio.Future[str | None] = self.front.loop.create_future()
        self._waiting[rid] = fut
        try:
            self.conn.send({"op": op, "id": rid, **args})
        except (ControlClosed, OSError):
            self._waiting.pop(rid, None)
            return "the postcopy page server is gone"
        return await asyncio.wait_for(fut, 30)


class ClientRelay:
    """One client: bytes both ways between it and the host's QMP server, stand-in answers in between."""

    def __init__(self, front: Front, client: socket.socket, host_end: socket.socket) -> None:
        self.front = front
        self.client = client
        self.host = host_end
        self.loop = front.loop
        self.negotiated = False
        self.oob = False  # the client enabled out-of-band commands (exec-oob is refused otherwise)
        self.streamer: JsonStreamer | None = None
        self._at_boundary = True  # the last byte relayed from the host ended a message
        self._injected: list[bytes] = []
        self._write_lock = asyncio.Lock()

    async def run(self) -> None:
        up = asyncio.create_task(self._up())
        down = asyncio.create_task(self._down())
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        for s in (self.client, self.host):
            with contextlib.suppress(OSError):
                s.close()

    async def _readable(self, sock: socket.socket) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = sock.fileno()
        self.loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError, OSError):  # the socket may have been closed meanwhile
                self.loop.remove_reader(fd)

    async def _recvmsg(self, sock: socket.socket) -> tuple[bytes, list[int]]:
        """The next bytes and any descriptors passed with them (getfd's SCM_RIGHTS)."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
            except (BlockingIOError, InterruptedError):
                await self._readable(sock)
                continue
            return data, fds

    async def _send_host(self, data: bytes, fds: list[int]) -> None:
        if fds:  # descriptors for getfd travel with the first byte, as the client sent them
            await self.loop.run_in_executor(None, lambda: socket.send_fds(self.host, [data[:1]], fds))
            for fd in fds:
                os.close(fd)
            data = data[1:]
        if data:
            await self.loop.sock_sendall(self.host, data)

    async def _up(self) -> None:
        """Client → host: raw while no postcopy runs; message by message (some answered here) while one does."""
        while True:
            data, fds = await self._recvmsg(self.client)
            if not data:
                return
            link = self.front.page_server
            if link is None or not link.standing_in:
                if self.streamer is not None:  # a postcopy just ended: back to raw
                    self.streamer = None
                self._note_negotiation(data)
                await self._send_host(data, fds)
                continue
            if self.streamer is None:
                self.streamer = JsonStreamer()
            for item in self.streamer.feed(data):
                if isinstance(item, JsonInputError):
                    await self.inject(_reply({"error": {"class": "GenericError", "desc": str(item)}}, {}))
                    continue
                if not await self._stand_in(item, link):
                    await self._send_host(item + b"\r\n", fds)
                    fds = []

    def _note_negotiation(self, data: bytes) -> None:
        if not self.negotiated and b"qmp_capabilities" in data:
            self.negotiated = True
            self.oob = b'"oob"' in data

    async def _stand_in(self, text: bytes, link: PageServerLink) -> bool:
        """Answer ``text`` here if it is one of the commands the front serves during postcopy."""
        try:
            req = json.loads(text)
        except ValueError:
            return False
        if not isinstance(req, dict) or set(req) - {"execute", "exec-oob", "arguments", "id"} or (
                ("execute" in req) == ("exec-oob" in req)):
            return False  # malformed: the host words the error
        name = req.get("execute", req.get("exec-oob"))
        if name == "qmp_capabilities":
            self.negotiated = True
            self.oob = "oob" in str(req.get("arguments"))
        if not self.negotiated or name not in STAND_IN or ("exec-oob" in req and not self.oob):
            return False  # the host answers (or words the error)
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            return False
        if name == "query-migrate":
            info: dict[str, Any] = {"status": link.status}
            if link.error and link.status in ("failed", "postcopy-paused"):
                info["error-desc"] = link.error
            await self.inject(_reply({"return": info}, req))
            return True
        if name == "migrate-recover" and not isinstance(args.get("uri"), str):
            return False  # the host's QMP server words the argument errors
        error = await (link.request("recover", uri=args["uri"]) if name == "migrate-recover"
                       else link.request("pause"))
        body = {"error": {"class": "GenericError", "desc": error}} if error else {"return": {}}
        await self.inject(_reply(body, req))
        return True

    async def inject(self, data: bytes) -> None:
        """Write a message of the front's own between the host's messages (never inside one)."""
        async with self._write_lock:
            if self._at_boundary:
                await self.loop.sock_sendall(self.client, data)
            else:
                self._injected.append(data)

    async def _down(self) -> None:
        """Host → client, raw; queued stand-in answers go out at the next message boundary."""
        while True:
            data, _ = await self._recvmsg(self.host)
            if not data:
                return
            async with self._write_lock:
                await self.loop.sock_sendall(self.client, data)
                self._at_boundary = data.endswith(b"\n")
                if self._at_boundary:
                    for msg in self._injected:
                        await self.loop.sock_sendall(self.client, msg)
                    self._injected.clear()


class Front:
    """The front process: listeners from the host, one relay per client, the page-server link."""

    def __init__(self, ctl: ControlConnection, host_pid: int) -> None:
        self.ctl = ctl
        self.host_pid = host_pid
        self.loop = asyncio.new_event_loop()
        self.page_server: PageServerLink | None = None
        self._listeners: list[socket.socket] = []
        self._done: asyncio.Event | None = None

    def kill_host(self) -> None:
        """The page server died and the host did not end itself (a fault may hold it): end it now."""
        try:
            os.kill(self.host_pid, signal.SIGKILL)
            log.error("host_killed", host_pid=self.host_pid, reason="its postcopy page server died while pages "
                      "were missing; the host could not end itself")
        except ProcessLookupError:
            pass

    def run(self) -> int:
        asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(self._main())

    async def _main(self) -> int:
        self._done = asyncio.Event()
        threading.Thread(target=self._control, name="front/control", daemon=True).start()
        await self._done.wait()
        for s in self._listeners:
            s.close()
        return 0

    def _control(self) -> None:
        try:
            while True:
                msg, fds = self.ctl.recv()
                self.loop.call_soon_threadsafe(self._on_control, msg, fds)
        except ControlClosed:
            pass  # the host ended: so does its front
        assert self._done is not None
        self.loop.call_soon_threadsafe(self._done.set)

    def _on_control(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "listener":
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            self._listeners.append(sock)
            context = None
            if msg.get("tls") is not None:  # a TLS monitor: the session ends in this process, as the client's does
                try:
                    context = from_description(PluginRegistry.from_environment(), msg["tls"]).stream_context()
                except (ValueError, OSError, PluginNotFound) as e:
                    log.error("front_tls_unavailable", error=str(e))
                    sock.close()
                    return
            self.loop.create_task(self._accept(sock, int(msg.get("index", 0)), context))
        elif op == "page-server":
            self.page_server = PageServerLink(self, ControlConnection(socket.socket(fileno=fds[0])))
        else:
            log.error("front_unknown_op", op=op)

    async def _accept(self, listener: socket.socket, index: int, context: ssl.SSLContext | None) -> None:
        while True:
            try:
                client, _ = await self.loop.sock_accept(listener)
            except OSError:
                return
            client.setblocking(False)
            self.loop.create_task(self._client(client, index, context))

    async def _client(self, client: socket.socket, index: int, context: ssl.SSLContext | None) -> None:
        """Hand a client to the host (after its TLS handshake, on a TLS monitor) and relay for it."""
        peer = None
        if context is not None:
            try:
                client, peer = await bridge(client, context)
            except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as e:
                log.warning("qmp_tls_handshake_failed", error=str(e))
                return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.ctl.send({"op": "client", "listener": index, "peer": peer}, [theirs.fileno()])
        except (ControlClosed, OSError):
            client.close()
            ours.close()
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        await ClientRelay(self, client, ours).run()


def main(argv: list[str]) -> int:
    configure_logging()
    if len(argv) != 3:
        log.error("front_usage", usage="python -m mig_core.qmp.front CONTROL_FD HOST_PID")
        return 2
    ctl = ControlConnection(socket.socket(fileno=int(argv[1])))
    return Front(ctl, int(argv[2])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
