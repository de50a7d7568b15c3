"""Opening a TLS session on a mig channel, with the destination's verdict on the source's identity.

In TLS 1.3 the client's handshake ends before the server has judged the client's certificate, so a
refusal would otherwise surface later as a broken stream. The server therefore answers every
handshake with one plaintext verdict byte inside the session (and, when it refuses, the reason), and
the client waits for it: a refused source fails at once with the destination's reason.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable

from mig_core.errors import ChannelError
from mig_core.ext.channel import Channel
from mig_tls.channel import TlsChannel

ACCEPTED = b"\x01"
REFUSED = b"\x00"
_LEN = struct.Struct("!H")

Describe = Callable[[ssl.SSLError], str]


def _channel(inner: Channel, ctx: ssl.SSLContext, server_side: bool, hostname: str | None) -> TlsChannel:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)
    return TlsChannel(inner, sslobj, incoming, outgoing)


def client_session(inner: Channel, ctx: ssl.SSLContext, hostname: str | None, describe: Describe) -> TlsChannel:
    """The source's end: handshake, then the destination's verdict; ChannelError with the reason if refused."""
    ch = _channel(inner, ctx, False, hostname)
    ch.handshake(describe)
    verdict = ch.read_plain(1, describe)
    if verdict != ACCEPTED:
        (n,) = _LEN.unpack(ch.read_plain(_LEN.size, describe))
        reason = ch.read_plain(n, describe).decode(errors="replace") if n else "refused"
        raise ChannelError(reason)
    return ch


def server_session(inner: Channel, ctx: ssl.SSLContext, describe: Describe,
                   check: Callable[[bytes | None], None] | None) -> TlsChannel:
    """The destination's end: handshake, ``check`` the peer's certificate, tell the source the verdict."""
    ch = _channel(inner, ctx, True, None)
    ch.handshake(describe)
    if check is not None:
        try:
            check(ch.peer_certificate)
        except ChannelError as e:
            reason = str(e).encode()[:1024]
            try:
                ch.send(REFUSED + _LEN.pack(len(reason)) + reason)
            except ChannelError:
                pass
            ch.close()
            raise
    ch.send(ACCEPTED)
    return ch
