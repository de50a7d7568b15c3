"""The TLS relay: a destination's TLS sessions end in a process of their own; the host reads plain text.

Postcopy hands the migration connection to the page server, another process, and an OpenSSL session
cannot move between processes. A session that ends in a relay leaves the host a plain socket pair,
which can be passed on like any socket; the relay keeps the session going whoever holds the other
end, and it never touches guest RAM, so no page fault stops it. Decryption also leaves the host's GIL.

A TLS listener starts one relay process (``RelayProcess``). For each accepted connection the host
passes the descriptor, the credentials' description and ``tls-authz`` as it stands then; the relay,
which runs no thread of its own, forks a child for the session. The child runs the handshake and the
authz check, answers on a status socket (accepted, or refused with the reason), then pumps both ways.
A session that ends in an error (a record that fails its authentication, a reset) says so on the
status socket before the plain side closes, so the host's channel fails with that reason, not with a
bare end of stream. Until the verdict, the host closing the status socket cancels the handshake.

The relay process itself is ``mig_core.engine.tls_relay_server``.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.engine.tls_handshake import HANDSHAKE_TIMEOUT
from mig_core.errors import ChannelAborted, ChannelError
from mig_core.ext.authz import AuthzCheck
from mig_core.ext.channel import Buffer, SocketChannel

log = structlog.get_logger("mig.tls.relay")

#: Send buffer of each end of the plain socket pair: a unix socket's default (208 KiB) makes the relay and
#: the host take turns every few records; the kernel caps it at net.core.wmem_max.
PLAIN_BUFFER = 4 << 20
#: How long a channel whose plain side ended waits for the relay's word on why (it is sent first).
ENDING_WAIT_S = 5.0


def readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has something to read (or its peer closed it) within ``timeout_s`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(int(timeout_s * 1000)))


# -- the host's side -------------------------------------------------------------------------------


class RelayedChannel(SocketChannel):
    """The host's end of a relayed session: a plain socket whose failures carry the relay's reason."""

    def __init__(self, sock: socket.socket, status: ControlConnection) -> None:
        super().__init__(sock)
        self._status = status
        self._ending_lock = threading.Lock()
        self._ending: list[str | None] = []  # filled once: the relay's reason (None: a clean end)

    def relay_error(self) -> str | None:
        """Why the relay ended the session (None: the peer closed it cleanly, or no word came)."""
        with self._ending_lock:
            if not self._ending:
                error = None
                try:
                    if readable(self._status.sock, ENDING_WAIT_S):
                        msg, _ = self._status.recv()
                        error = msg.get("error") if msg["op"] == "ended" else None
                except (ControlClosed, OSError):
                    pass
                self._ending.append(error)
            return self._ending[0]

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        try:
            return super()._sendv(buffers)
        except ChannelError as e:
            raise self._with_reason(e) from None

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = super()._recv_into(view)
        except ChannelError as e:
            raise self._with_reason(e) from None
        if n == 0 and self.abort_reason is None:
            error = self.relay_error()
            if error:
                raise ChannelError(error)
        return n

    def _with_reason(self, e: ChannelError) -> ChannelError:
        """A failed send or receive, with the relay's reason where it gave one (an abort stays an abort)."""
        if isinstance(e, ChannelAborted):
            return e
        return ChannelError(self.relay_error() or str(e))

    def close(self) -> None:
        super().close()
        self._status.close()


class RelayProcess:
    """One relay process, started with the listener it serves and stopped with it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "mig_core.engine.tls_relay_server",
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.ctl = ControlConnection(ours)
        log.debug("tls_relay_started", pid=self.proc.pid)

    def open(self, raw: SocketChannel, creds: Mapping[str, Any], authz: AuthzCheck | None,
             abort_check: Callable[[], bool]) -> RelayedChannel:
        """Hand ``raw`` (closed here) to the relay; the plain channel once the handshake and ``authz``
        passed, or ChannelError with the reason (also on ``abort_check()`` and after the handshake timeout)."""
        plain_host, plain_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status_host, status_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (plain_host, plain_relay):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PLAIN_BUFFER)
        try:
            self.ctl.send({"op": "session", "creds": dict(creds), "authz": None if authz is None else authz.to_wire(),
                           "timeout": HANDSHAKE_TIMEOUT},
                          [raw.fileno(), plain_relay.fileno(), status_relay.fileno()])
        except (ControlClosed, OSError) as e:
            plain_host.close()
            status_host.close()
            raise ChannelError(f"TLS handshake failed: the TLS relay process is gone ({e})") from None
        finally:
            raw.close()
            plain_relay.close()
            status_relay.close()
        status = ControlConnection(status_host)
        try:
            verdict = self._verdict(status, abort_check)
        except BaseException:
            plain_host.close()
            status.close()  # the relay's child sees it and drops the connection
            raise
        if verdict["op"] != "accepted":
            plain_host.close()
            status.close()
            raise ChannelError(str(verdict.get("reason") or "TLS handshake failed"))
        return RelayedChannel(plain_host, status)

    @staticmethod
    def _verdict(status: ControlConnection, abort_check: Callable[[], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + ENDING_WAIT_S  # the child times out first
        while not readable(status.sock, 0.05):
            if abort_check():
                raise ChannelError("cancelled during the TLS handshake")
            if time.monotonic() > deadline:
                raise ChannelError(f"TLS handshake failed: the TLS relay gave no verdict within "
                                   f"{HANDSHAKE_TIMEOUT + ENDING_WAIT_S:g} s")
        try:
            msg, _ = status.recv()
        except ControlClosed:
            raise ChannelError("TLS handshake failed: the TLS relay ended the session without a verdict") from None
        return msg

    def close(self) -> None:
        """Stop the relay process; sessions it already forked go on until their connections end."""
        self.ctl.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
