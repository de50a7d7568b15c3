"""TLS for a tcp monitor: the session ends here, and the QMP server reads plain text from a socket pair.

``tcp:HOST:PORT,tls-creds=ID[,tls-authz=ID]`` as QEMU's socket chardev takes them: the client must speak
TLS 1.3 with the server credentials ``ID`` (and, with ``tls-authz``, present a certificate whose
distinguished name the authz object allows). The QMP session code stays as it is, on one end of a
socket pair; ``bridge`` pumps bytes between the other end and the TLS stream. A monitor carries little,
so the extra hop costs nothing that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from mig_core.errors import ChannelError, QMPError
from mig_core.ext.channel_security import Authorize, ChannelSecurity

if TYPE_CHECKING:
    from mig_core.control.objects import ObjectRegistry
    from mig_core.qmp.address import MonitorAddress

log = structlog.get_logger("mig.qmp")

#: a client that has not finished its handshake by then is dropped
HANDSHAKE_TIMEOUT = 10.0


@dataclass
class MonitorTls:
    """One tcp monitor's TLS: its credentials' context, and the authz check each client passes."""

    creds: ChannelSecurity
    context: ssl.SSLContext
    authorize: Authorize | None
    authz_id: str = ""

    @classmethod
    def for_address(cls, objects: ObjectRegistry, addr: MonitorAddress) -> MonitorTls | None:
        """The TLS ``addr`` asks for (None for a plain monitor); ``ValueError`` with QEMU's texts for
        credentials or an authz object that are missing or of the wrong kind."""
        if not addr.tls_creds:
            return None
        try:
            creds = objects.tls_creds(addr.tls_creds, "server")
            authorize = None
            if addr.tls_authz:
                objects.authz(addr.tls_authz)  # there now, and looked up again at each client (as QEMU)
                authorize = objects.authorizer(addr.tls_authz, creds.identity_kind)
        except QMPError as e:
            raise ValueError(e.desc) from None
        return cls(creds, creds.stream_context(), authorize, addr.tls_authz)

    def admit(self, peer: bytes | None) -> bool:
        """Whether the client whose certificate is ``peer`` may use the monitor (tls-authz); logs a refusal."""
        if self.authorize is None:
            return True
        if peer is None:
            log.warning("qmp_tls_refused", reason="the client sent no certificate", authz=self.authz_id)
            return False
        try:
            self.authorize(self.creds.peer_identity(peer))
        except (ChannelError, ValueError) as e:
            log.warning("qmp_tls_refused", reason=str(e), authz=self.authz_id)
            return False
        return True

    async def accept(self, conn: socket.socket) -> socket.socket | None:
        """The plain socket of an admitted client, or None (handshake failed or client refused; logged)."""
        try:
            inner, peer = await bridge(conn, self.context)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as e:
            log.warning("qmp_tls_handshake_failed", error=str(e))
            return None
        if not self.admit(peer):
            inner.close()
            return None
        return inner


async def bridge(conn: socket.socket, context: ssl.SSLContext) -> tuple[socket.socket, bytes | None]:
    """Run the server side of a TLS handshake on the accepted ``conn``; returns the plain socket the QMP
    session reads (non-blocking) and the client's certificate (DER), or raises ``OSError`` /
    ``ssl.SSLError`` / ``TimeoutError`` (``conn`` closed) when the handshake fails."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn, ssl=context,
                                                          ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    except BaseException:
        conn.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    ssl_object = transport.get_extra_info("ssl_object")
    peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    inner.setblocking(False)
    outer.setblocking(False)
    loop.create_task(_pump(reader, writer, outer))
    return inner, peer


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outer: socket.socket) -> None:
    """Bytes both ways until either side closes; then both close."""
    loop = asyncio.get_running_loop()

    async def inbound() -> None:  # client → QMP server
        while data := await reader.read(65536):
            await loop.sock_sendall(outer, data)

    async def outbound() -> None:  # QMP server → client
        while data := await loop.sock_recv(outer, 65536):
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(inbound()), asyncio.ensure_future(outbound())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        outer.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
