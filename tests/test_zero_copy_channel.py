"""Zero-copy sends keep every buffer alive until the kernel's completion for it has been read.

Loopback always copies, so the bytes on the wire cannot show a buffer freed too early; the test
reads completions against send ids instead and watches the buffers through weak references.
"""

from __future__ import annotations

import gc
import socket
import threading
import weakref

import numpy as np

import mig_core.ext.channel as channel_mod
from mig_core.ext.channel import SocketChannel


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def recv_all(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return bytes(buf)


def flush(ch: SocketChannel) -> bool:
    """flush_zero_copy in a thread, so a completion that never matches fails instead of hanging."""
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(ch.flush_zero_copy()), daemon=True)
    t.start()
    t.join(60)
    assert out, "flush_zero_copy did not see completions for every send id"
    return out[0]


def test_buffers_are_held_until_their_completion_is_read():
    a, b = tcp_pair()
    ch = SocketChannel(a)
    try:
        ch.enable_zero_copy()
        arrays = [np.full(64 << 10, i + 1, dtype=np.uint8) for i in range(3)]
        refs = [weakref.ref(x) for x in arrays]
        for x in arrays:
            ch.sendv_zero_copy([x, memoryview(x)[:16]])  # two buffers of one send
        del arrays, x
        gc.collect()
        # the test holds no reference: only the channel keeps them, one entry per send id
        assert all(r() is not None for r in refs)
        assert ch.zero_copy_pending == [0, 1, 2]
        data = recv_all(b, 3 * ((64 << 10) + 16))
        assert data == b"".join(bytes([i + 1]) * ((64 << 10) + 16) for i in range(3))
        copied = flush(ch)
        assert ch.zero_copy_pending == []
        gc.collect()
        assert all(r() is None for r in refs)  # released once their completions were read
        assert copied  # loopback: the kernel copied after all
        # ids go on from where they were
        y = np.ones(4096, dtype=np.uint8)
        ch.sendv_zero_copy([y])
        assert ch.zero_copy_pending == [3]
        recv_all(b, 4096)
        flush(ch)
        assert ch.zero_copy_pending == []
    finally:
        ch.close()
        b.close()


def test_pinned_bytes_stay_bounded(monkeypatch):
    """Past the pin limit a send waits for completions, so a long pass does not hold all it sent."""
    monkeypatch.setattr(channel_mod, "ZERO_COPY_PIN_LIMIT", 256 << 10)
    a, b = tcp_pair()
    ch = SocketChannel(a)
    total = 64 * (64 << 10)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(recv_all(b, total)), daemon=True)
    reader.start()
    try:
        ch.enable_zero_copy()
        for i in range(64):
            ch.sendv_zero_copy([np.full(64 << 10, i, dtype=np.uint8)])
            assert ch._zc_pinned_bytes <= 256 << 10
        reader.join(60)
        assert received and received[0] == b"".join(bytes([i]) * (64 << 10) for i in range(64))
        flush(ch)
        assert ch.zero_copy_pending == []
    finally:
        ch.close()
        b.close()
