"""The TLS relay on its own (mig_core.engine.tls_relay), over real loopback sockets and its real process: a
session whose plain end another process continues, a silent peer cancelled by closing the listener, and a
relay that died started again for the next connection. The credentials are the mig-tls plugin's (the
relay serves any channel-security plugin; this one is first-party and always installed by ``make test``)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mig_core.engine.tls import TlsListener
from mig_core.errors import ChannelAborted, ChannelError
from mig_core.ext.channel import SocketChannel
from mig_core.ext.transport import Listener
from mig_core.schema.sockets import SocketAddress

pytest.importorskip("mig_tls")
from mig_tls.testing import make_pki  # noqa: E402
from mig_tls.x509 import X509Credentials  # noqa: E402

_CONTINUE = r"""
import socket, sys, hashlib
s = socket.socket(fileno=int(sys.argv[1]))
h, got, want = hashlib.sha256(), 0, int(sys.argv[2])
while got < want:
    b = s.recv(min(1 << 20, want - got))
    if not b: break
    h.update(b); got += len(b)
s.sendall(h.hexdigest().encode())
"""


class _TcpListener(Listener):
    """A plain loopback listener giving SocketChannels, as the socket transport's does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]

    @property
    def socket_addresses(self) -> list[SocketAddress]:
        return []

    def accept(self) -> SocketChannel:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            raise ChannelError(str(e)) from None
        return SocketChannel(conn)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def creds(tmp_path: Path) -> tuple[X509Credentials, X509Credentials]:
    make_pki(tmp_path / "pki")
    return (X509Credentials("srv", {"dir": str(tmp_path / "pki"), "endpoint": "server"}),
            X509Credentials("cli", {"dir": str(tmp_path / "pki"), "endpoint": "client"}))


def _relay_children(listener: TlsListener) -> list[int]:
    """The relay's forked sessions: processes whose parent is the relay (read from /proc/PID/stat)."""
    assert listener._relay is not None
    relay = listener._relay.proc.pid
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if int(fields[1]) == relay:
            children.append(int(stat.parent.name))
    return children


def test_a_relayed_session_continues_in_another_process(creds):
    """The host's plain end passed to another process (as postcopy passes it to the page server) and
    closed here: the session goes on, and every byte the source sent arrives in order."""
    server, client = creds
    listener = TlsListener(_TcpListener(), server, lambda: None)
    data = os.urandom(8 << 20)
    try:
        _answers.clear()
        ended = threading.Event()
        sent = threading.Thread(target=lambda: _send_and_read_back(client, listener.inner.port, data,  # type: ignore[attr-defined]
                                                                   read_after=ended))
        sent.start()
        plain = listener.accept()
        assert plain.fileno() >= 0  # a descriptor another process can carry on with
        helper = subprocess.Popen([sys.executable, "-c", _CONTINUE, str(plain.fileno()), str(len(data))],
                                  pass_fds=[plain.fileno()])
        plain.close()  # the helper holds the connection now
        assert helper.wait(60) == 0
        # the helper's end closed, so the relay's session ends: the source reads only after that, when the
        # answer and everything the relay sent after it wait together (an alert there once broke the answer)
        deadline = time.monotonic() + 30
        while _relay_children(listener):
            assert time.monotonic() < deadline, "the relay's session outlived both ends"
            time.sleep(0.02)
        ended.set()
        sent.join(60)
        assert _answers == [hashlib.sha256(data).hexdigest().encode(), b""]  # the answer, then a clean end
    finally:
        listener.close()


_answers: list[bytes] = []


def test_closing_the_listener_cancels_a_silent_peers_handshake(creds):
    server, _client = creds
    listener = TlsListener(_TcpListener(), server, lambda: None)
    silent = socket.create_connection(("127.0.0.1", listener.inner.port))  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 30
        while not _relay_children(listener):  # the relay forked a child for it: the handshake waits
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (child,) = _relay_children(listener)
        got: list[BaseException] = []
        waiter = threading.Thread(target=lambda: got.append(_accept_error(listener)))
        waiter.start()
        listener.close()
        waiter.join(10)
        assert isinstance(got[0], ChannelAborted), got
        deadline = time.monotonic() + 10  # the child saw the host give up and dropped the connection
        while os.path.exists(f"/proc/{child}") and _state(child) != "Z":
            assert time.monotonic() < deadline, "the relay's session outlived the cancelled handshake"
            time.sleep(0.02)
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed, not left hanging
    finally:
        silent.close()


def _accept_error(listener: TlsListener) -> BaseException:
    try:
        listener.accept()
    except BaseException as e:
        return e
    return AssertionError("accepted")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_relay_that_died_is_started_again_for_the_next_connection(creds):
    server, client = creds
    listener = TlsListener(_TcpListener(), server, lambda: None)
    try:
        assert listener._relay is not None
        first = listener._relay.proc.pid
        os.kill(first, signal.SIGKILL)  # the OOM killer, an operator's mistake…
        listener._relay.proc.wait(10)
        port = listener.inner.port  # type: ignore[attr-defined]
        data = os.urandom(1 << 20)
        _answers.clear()
        sender = threading.Thread(target=lambda: _send_and_read_back(client, port, data))
        sender.start()
        plain = listener.accept()
        assert listener._relay is not None and listener._relay.proc.pid != first
        assert plain.recv_exact(len(data)) == data
        plain.send(b"k" * 64)
        sender.join(30)
        assert _answers == [b"k" * 64]
        plain.close()
    finally:
        listener.close()


def _send_and_read_back(client: X509Credentials, port: int, data: bytes,
                        read_after: threading.Event | None = None) -> None:
    """Send ``data`` over TLS and keep the 64-byte answer in ``_answers``; with ``read_after``, read only once it
    is set, and then also what follows the answer (b"": the session ended cleanly)."""
    ch = client.wrap_client(SocketChannel(socket.create_connection(("127.0.0.1", port))), "127.0.0.1")
    ch.send(data)
    if read_after is not None:
        assert read_after.wait(60)
    _answers.append(ch.recv_exact(64))
    if read_after is not None:
        rest = bytearray(1)
        _answers.append(bytes(rest[:ch.recv_some(rest)]))
    ch.close()
