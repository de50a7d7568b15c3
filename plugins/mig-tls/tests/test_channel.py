"""The TLS channel on its own, over a real socket pair: the end of a session in either direction."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from mig_tls.testing import make_pki
from mig_tls.x509 import X509Credentials

from mig_core.errors import ChannelError
from mig_core.ext.channel import Channel, SocketChannel


@pytest.fixture
def pair(tmp_path: Path):
    """A handshaken (server, client) pair of TLS channels over a unix socket pair."""
    make_pki(tmp_path / "pki")
    server = X509Credentials("srv", {"dir": str(tmp_path / "pki"), "endpoint": "server"})
    client = X509Credentials("cli", {"dir": str(tmp_path / "pki"), "endpoint": "client"})
    a, b = socket.socketpair()
    served: list[Channel] = []
    handshake = threading.Thread(target=lambda: served.append(server.wrap_server(SocketChannel(a), None)))
    handshake.start()
    cli = client.wrap_client(SocketChannel(b), "127.0.0.1")
    handshake.join(30)
    (srv,) = served
    yield srv, cli
    srv.close()
    cli.close()


def _shut_receiving(ch: Channel) -> None:
    """Shut the receive side under the TLS session, as the relay does once the host's end is done."""
    ch.inner.sock.shutdown(socket.SHUT_RD)  # type: ignore[attr-defined]


def test_data_that_came_before_the_peers_alert_are_read_before_its_reason(pair):
    srv, cli = pair
    srv.send(b"x" * 64)
    _shut_receiving(srv)
    assert srv.recv_some(bytearray(16)) == 0  # an end of stream OpenSSL blames on the peer: it queues an alert
    srv.close()  # …which goes out now, right behind the data
    assert cli.recv_exact(64) == b"x" * 64  # both arrive in one read: the data still come first
    with pytest.raises(ChannelError, match="TLS receive failed: TLSV1_ALERT_DECODE_ERROR"):
        cli.recv_some(bytearray(16))
    with pytest.raises(ChannelError, match="DECODE_ERROR"):  # and the reason stays
        cli.recv_some(bytearray(16))


def test_closing_for_sending_says_goodbye_and_keeps_receiving(pair):
    srv, cli = pair
    srv.send(b"last words")
    srv.close_write()
    with pytest.raises(ChannelError, match="already closed the session for sending"):
        srv.send(b"more")
    cli.send(b"late")
    assert srv.recv_exact(4) == b"late"
    _shut_receiving(srv)  # the end this causes is not the peer's fault: nothing more goes out
    assert srv.recv_some(bytearray(16)) == 0
    srv.close()
    assert cli.recv_exact(10) == b"last words"
    assert cli.recv_some(bytearray(16)) == 0  # close_notify: a clean end, no alert behind it
    assert cli.recv_some(bytearray(16)) == 0
