"""The host ↔ page-server control connection: length-framed msgpack maps, descriptors passed with them.

A stream socket (not seqpacket): a received-pages bitmap of many GiB of RAM is
larger than one datagram may be. Descriptors travel with a message's first
byte (SCM_RIGHTS), so they arrive together with the message that names them.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import msgpack

_LEN = struct.Struct("<I")
#: The GIL switch interval of the page server, and of a source while it serves postcopy requests: a
#: thread that wants the GIL waits up to this long for the one holding it (the default is 5 ms).
SWITCH_INTERVAL_S = 0.0002
MAX_MESSAGE = 256 << 20


class ControlClosed(Exception):
    """The other end closed the control connection (it exited, or died)."""


class ControlConnection:
    """One end of the control connection; ``send`` may be called from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        payload = msgpack.packb(msg, use_bin_type=True)
        data = _LEN.pack(len(payload)) + payload
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [data[:1]], fds)
                if sent != 1:
                    raise ControlClosed("could not send descriptors")
                data = data[1:]
            self.sock.sendall(data)

    def _recv_exact(self, n: int, first: bytes = b"") -> bytes:
        buf = bytearray(first)
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ControlClosed("the control connection was closed")
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it; ControlClosed at end of stream."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1, 64)
        except OSError as e:
            raise ControlClosed(f"the control connection failed: {e.strerror or e}") from None
        if not data:
            raise ControlClosed("the control connection was closed")
        head = self._recv_exact(_LEN.size, data)
        (length,) = _LEN.unpack(head)
        if length > MAX_MESSAGE:
            raise ControlClosed(f"a control message of {length} bytes")
        msg = msgpack.unpackb(self._recv_exact(length), raw=False, strict_map_key=False)
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ControlClosed(f"a malformed control message: {msg!r:.80}")
        return msg, list(fds)

    def close(self) -> None:
        self.sock.close()
