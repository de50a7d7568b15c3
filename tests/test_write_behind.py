"""The main stream's write-behind thread keeps order, reports failures and never hangs a cancel."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from mig_core.engine.write_behind import WriteBehind
from mig_core.ext.channel import ChannelAborted, ChannelError, SocketChannel


def _drain(sock: socket.socket, out: bytearray) -> None:
    while chunk := sock.recv(1 << 20):
        out += chunk


def test_order_and_bytes_are_kept():
    a, b = socket.socketpair()
    ch = SocketChannel(a)
    wb = WriteBehind(ch)
    got = bytearray()
    reader = threading.Thread(target=_drain, args=(b, got))
    reader.start()
    rng = np.random.default_rng(3)
    ram = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    expected = bytearray()
    for i in range(200):
        lo = int(rng.integers(0, len(ram) - (1 << 20)))
        n = int(rng.integers(1, 1 << 20))
        head = i.to_bytes(4, "little")
        wb.sendv([head, memoryview(ram)[lo:lo + n]])  # a view of "RAM", sent after this call returns
        expected += head + ram[lo:lo + n].tobytes()
    wb.send(b"end")
    expected += b"end"
    wb.flush()
    assert ch.bytes_sent == len(expected)
    wb.close()
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert bytes(got) == bytes(expected)
    a.close()
    b.close()


def test_abort_unblocks_a_stuck_writer_and_later_calls_raise():
    a, b = socket.socketpair()  # nobody reads b: the writer thread blocks in sendmsg
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    ch = SocketChannel(a)
    wb = WriteBehind(ch)
    block = np.zeros(4 << 20, dtype=np.uint8)
    blocked = threading.Event()

    def fill() -> None:
        try:
            for _ in range(10):  # more than the queue holds: this thread blocks too
                wb.sendv([block])
        except ChannelError:
            blocked.set()

    t = threading.Thread(target=fill)
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and not blocked.is_set()
    start = time.monotonic()
    ch.abort("migration cancelled")
    t.join(2)
    assert not t.is_alive() and blocked.is_set()
    with pytest.raises(ChannelAborted, match="migration cancelled"):
        wb.flush()
    with pytest.raises(ChannelAborted):
        wb.send(b"more")
    wb.close()
    assert time.monotonic() - start < 1.0
    a.close()
    b.close()


def test_peer_gone_is_a_send_error():
    a, b = socket.socketpair()
    b.close()
    wb = WriteBehind(SocketChannel(a))
    wb.send(b"x" * 100)
    with pytest.raises(ChannelError, match="send failed"):
        wb.flush()
    wb.close()
    a.close()
