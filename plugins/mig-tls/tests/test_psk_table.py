"""PSK sessions leave nothing behind in sslpsk3's session table: not after a handshake, a failed one, or a
session dropped in the middle of one (before Python 3.13, where sslpsk3 supplies PSK)."""

from __future__ import annotations

import gc
import socket
import ssl
import threading
from pathlib import Path

import pytest
from mig_tls.psk import NATIVE_PSK, PskCredentials
from sslpsk3.sslpsk3 import psk_contexts

from mig_core.errors import ChannelError
from mig_core.ext.channel import SocketChannel

pytestmark = pytest.mark.skipif(NATIVE_PSK, reason="Python 3.13+ has PSK in ssl: sslpsk3's table is not used")

KEY = "5e" * 32


def credentials(tmp_path: Path, endpoint: str, key: str = KEY) -> PskCredentials:
    directory = tmp_path / endpoint
    directory.mkdir(exist_ok=True)
    (directory / "keys.psk").write_text(f"qemu:{key}\n")
    return PskCredentials(f"psk-{endpoint}", {"dir": str(directory), "endpoint": endpoint})


def handshake(client: PskCredentials, server: PskCredentials) -> dict[str, object]:
    """Both ends of one session over a real socket pair; what each end got (its channel or its error)."""
    a, b = socket.socketpair()
    got: dict[str, object] = {}

    def serve() -> None:
        try:
            got["server"] = server.wrap_server(SocketChannel(b), None)
        except ChannelError as e:
            got["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        got["client"] = client.wrap_client(SocketChannel(a), None)
    except ChannelError as e:
        got["client"] = e
        a.close()  # the server end sees the end of the stream, whatever it waits for
    t.join(30)
    assert not t.is_alive(), "the server's handshake did not end"
    for end in got.values():
        if not isinstance(end, ChannelError):
            end.close()  # type: ignore[attr-defined]
    a.close()
    b.close()
    return got


def test_a_handshake_leaves_no_entry(tmp_path: Path) -> None:
    before = dict(psk_contexts)
    got = handshake(credentials(tmp_path, "client"), credentials(tmp_path, "server"))
    assert not isinstance(got["client"], ChannelError), got
    assert not isinstance(got["server"], ChannelError), got
    assert psk_contexts == before


def test_a_failed_handshake_leaves_no_entry(tmp_path: Path) -> None:
    before = dict(psk_contexts)
    got = handshake(credentials(tmp_path, "client", key="ff" * 32), credentials(tmp_path, "server"))
    assert isinstance(got["client"], ChannelError) and isinstance(got["server"], ChannelError), got
    assert "do not match" in str(got["client"]) or "do not match" in str(got["server"]), got
    assert psk_contexts == before


def test_a_session_dropped_mid_handshake_leaves_no_entry(tmp_path: Path) -> None:
    client = credentials(tmp_path, "client")
    before = dict(psk_contexts)
    session = client.context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        session.do_handshake()  # the ClientHello is written; the answer never comes
    assert len(psk_contexts) == len(before) + 1  # what the next round trip's key lookup would use
    del session
    gc.collect()
    assert psk_contexts == before
