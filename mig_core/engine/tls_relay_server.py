"""The TLS relay process (see ``mig_core.engine.tls_relay``): one forked child per session.

The relay runs no thread of its own, so forking is safe; the credentials are loaded once per
description and every later session forks with them ready. A child runs the handshake and the authz
check within the handshake timeout (the host closing the status socket cancels it), answers on the
status socket, then pumps plain text both ways until both ends are done.

Run as ``python -m mig_core.engine.tls_relay_server CONTROL_FD``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import structlog

from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.engine.tls_handshake import HANDSHAKE_TIMEOUT, bounded
from mig_core.engine.tls_relay import readable
from mig_core.errors import ChannelAborted, ChannelError, MigError
from mig_core.ext.authz import AuthzCheck
from mig_core.ext.channel import Channel, SocketChannel
from mig_core.ext.channel_security import ChannelSecurity, from_description
from mig_core.logconfig import configure_logging
from mig_core.plugin.registry import PluginRegistry

log = structlog.get_logger("mig.tls.relay")

#: Bytes moved per call in each direction.
PUMP_CHUNK = 256 << 10


def _tell(status: ControlConnection, msg: dict[str, Any]) -> None:
    try:
        status.send(msg)
    except (ControlClosed, OSError):
        pass  # the host is gone or no longer listening: nothing to tell


def _host_gave_up(status: ControlConnection) -> bool:
    """Before the verdict the host sends nothing: its end readable means it closed it."""
    return readable(status.sock, 0)


class _Session:
    """One forked child: a TLS session on ``raw``, plain text on ``plain``, word to the host on ``status``."""

    def __init__(self, raw: SocketChannel, plain: socket.socket, status: ControlConnection) -> None:
        self.raw = raw
        self.plain = plain
        self.status = status
        self._ended = threading.Lock()
        self._told = False

    def _end(self, error: str | None) -> None:
        """Tell the host why the session ends (once), before the plain side closes."""
        with self._ended:
            if self._told:
                return
            self._told = True
        if error:
            log.warning("tls_relay_session_failed", error=error)
        _tell(self.status, {"op": "ended", "error": error})

    def run(self, creds: ChannelSecurity, authz: AuthzCheck | None, timeout: float) -> int:
        try:
            tls = bounded(self.raw, lambda: creds.wrap_server(self.raw, authz), lambda: _host_gave_up(self.status),
                          timeout)
        except (ChannelError, OSError) as e:
            _tell(self.status, {"op": "refused", "reason": str(e)})
            return 1
        _tell(self.status, {"op": "accepted"})
        inbound = threading.Thread(target=self._inbound, args=(tls,), name="tls-relay-in", daemon=True)
        inbound.start()
        self._outbound(tls)
        inbound.join()
        tls.close()  # close_notify, if the session is still whole
        return 0

    def _inbound(self, tls: Channel) -> None:
        """The peer's plaintext to the host, until the peer ends the session."""
        buf = memoryview(bytearray(PUMP_CHUNK))
        try:
            while n := tls.recv_some(buf):
                self.plain.sendall(buf[:n])
        except ChannelAborted:
            log.debug("tls_relay_inbound_ended", how="aborted", bytes=tls.bytes_received)
            self._end(None)  # the host side ended first
            return
        except ChannelError as e:
            self._end(str(e))
            self._shut(self.plain, socket.SHUT_RDWR)
            return
        except OSError as e:  # the host closed its end: the outbound pump ends the session
            log.debug("tls_relay_inbound_ended", how="host closed", error=str(e), bytes=tls.bytes_received)
            return
        log.debug("tls_relay_inbound_ended", how="peer ended the session", bytes=tls.bytes_received)
        self._end(None)
        self._shut(self.plain, socket.SHUT_WR)

    def _outbound(self, tls: Channel) -> None:
        """The host's plaintext to the peer, until the host closes its end."""
        buf = memoryview(bytearray(PUMP_CHUNK))
        try:
            while n := self.plain.recv_into(buf):
                tls.send(buf[:n])
        except ChannelError as e:
            self._end(str(e))
            self._shut(self.plain, socket.SHUT_RDWR)
        except OSError:
            pass
        log.debug("tls_relay_outbound_ended", bytes=tls.bytes_sent)
        # the host is done: say goodbye first, then stop reading from the peer (this wakes the inbound pump).
        # In that order: OpenSSL takes the end of stream we cause for the peer's fault and queues an alert,
        # which would reach the peer with the last data it has still to read.
        tls.close_write()
        self._shut(self.raw.sock, socket.SHUT_RD)

    @staticmethod
    def _shut(sock: socket.socket, how: int) -> None:
        try:
            sock.shutdown(how)
        except OSError:
            pass


def _serve(ctl: ControlConnection, registry: PluginRegistry) -> int:
    """The relay's loop: one forked child per session, until the host closes the control connection."""
    loaded: dict[str, ChannelSecurity | str] = {}
    while True:
        try:
            msg, fds = ctl.recv()
        except ControlClosed:
            return 0
        try:
            if msg["op"] != "session" or len(fds) != 3:
                log.error("tls_relay_bad_request", op=msg["op"], fds=len(fds))
                continue
            key = json.dumps(msg["creds"], sort_keys=True)
            creds = loaded.get(key)
            if creds is None:  # loaded once per description: every later session forks with it ready
                try:
                    creds = loaded[key] = from_description(registry, msg["creds"])
                except (ValueError, MigError) as e:
                    creds = loaded[key] = f"TLS handshake failed: the credentials cannot be loaded: {e}"
            if isinstance(creds, str):
                status = ControlConnection(socket.socket(fileno=os.dup(fds[2])))
                _tell(status, {"op": "refused", "reason": creds})
                status.close()
                continue
            if os.fork() == 0:
                code = 1
                try:
                    ctl.close()
                    raw = SocketChannel(socket.socket(fileno=fds[0]))
                    status = ControlConnection(socket.socket(fileno=fds[2]))
                    session = _Session(raw, socket.socket(fileno=fds[1]), status)
                    authz = AuthzCheck.from_wire(msg["authz"]) if msg.get("authz") else None
                    code = session.run(creds, authz, float(msg.get("timeout") or HANDSHAKE_TIMEOUT))
                except BaseException:  # a bug: said before the session ends (os._exit prints nothing)
                    log.exception("tls_relay_session_crashed")
                finally:
                    os._exit(code)
        finally:
            for fd in fds:
                os.close(fd)


def main(argv: Sequence[str]) -> int:
    configure_logging()
    if len(argv) != 2:
        log.error("tls_relay_usage", usage="python -m mig_core.engine.tls_relay CONTROL_FD")
        return 2
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions reap themselves
    return _serve(ControlConnection(socket.socket(fileno=int(argv[1]))), PluginRegistry.from_environment())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
