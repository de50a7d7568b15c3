"""Channels over memory: a connected in-process pair (``loopback_pair``) and a byte buffer (``BytesChannel``).

They carry the same streams as sockets where both ends live in one process: tests, and device-state streams
kept beside RAM (snapshots, xen-save-devices-state).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from mig_core.errors import ChannelError
from mig_core.ext.channel import Buffer, Channel, ChannelAbilities

__all__ = ["BytesChannel", "LoopbackChannel", "loopback_pair"]


class _Pipe:
    """One direction of an in-memory channel: a bounded byte buffer."""

    def __init__(self, capacity: int) -> None:
        self.buf = bytearray()
        self.capacity = capacity
        self.closed = False
        self.cond = threading.Condition()


class LoopbackChannel(Channel):
    """One end of an in-memory channel pair (see ``loopback_pair``)."""

    abilities = ChannelAbilities(multiple_channels=True, return_path=True)

    def __init__(self, out: _Pipe, inp: _Pipe) -> None:
        super().__init__()
        self._out, self._in = out, inp

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        p = self._out
        with p.cond:
            while len(p.buf) >= p.capacity and not p.closed and self.abort_reason is None:
                p.cond.wait()
            self._check_abort()
            if p.closed:
                raise ChannelError("send failed: the peer closed the channel")
            room = p.capacity - len(p.buf)
            n = 0
            for b in buffers:
                take = memoryview(b)[: room - n]
                p.buf += take
                n += take.nbytes
                if n == room:
                    break
            p.cond.notify_all()
            return n

    def _recv_into(self, view: memoryview) -> int:
        p = self._in
        with p.cond:
            while not p.buf and not p.closed and self.abort_reason is None:
                p.cond.wait()
            self._check_abort()
            n = min(len(p.buf), view.nbytes)
            view[:n] = p.buf[:n]
            del p.buf[:n]
            p.cond.notify_all()
            return n

    def _unblock(self) -> None:
        for p in (self._out, self._in):
            with p.cond:
                p.cond.notify_all()

    def close(self) -> None:
        for p in (self._out, self._in):
            with p.cond:
                p.closed = True
                p.cond.notify_all()


def loopback_pair(capacity: int = 4 << 20) -> tuple[LoopbackChannel, LoopbackChannel]:
    """Two connected in-memory channels; each direction buffers at most ``capacity`` bytes."""
    a, b = _Pipe(capacity), _Pipe(capacity)
    return LoopbackChannel(a, b), LoopbackChannel(b, a)


class BytesChannel(Channel):
    """A channel over memory: reads what it was given, collects what is written (``data``).

    Device-state streams that live beside RAM rather than in a migration (snapshots, xen-save-devices-state)
    are written and read through one.
    """

    def __init__(self, data: bytes = b"") -> None:
        super().__init__()
        self._in = memoryview(data)
        self._pos = 0
        self._out = bytearray()

    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return bytes(self._out)

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        n = 0
        for b in buffers:
            view = memoryview(b).cast("B")
            self._out += view
            n += view.nbytes
        return n

    def _recv_into(self, view: memoryview) -> int:
        n = min(view.nbytes, self._in.nbytes - self._pos)
        view[:n] = self._in[self._pos:self._pos + n]
        self._pos += n
        return n

    def _unblock(self) -> None:
        pass

    def close(self) -> None:
        self._in.release()
