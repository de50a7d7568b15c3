"""A fault-injecting proxy between two hosts: it forwards unix-socket connections until told to cut them.

Tests put it between a source and a destination to break a migration's
connection the way a network does (both ends see the other vanish), without
touching either process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class CuttableProxy:
    """Listens at ``listen_path`` and forwards each connection to ``target_path``; ``cut()`` breaks them all."""

    def __init__(self, listen_path: Path | str, target_path: Path | str) -> None:
        self.listen_path = str(listen_path)
        self.target_path = str(target_path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.listen_path)
        self._server.listen(8)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        #: bytes forwarded from the listening side to the target (the source's stream)
        self.forwarded = 0
        #: cut everything once ``forwarded`` reaches this (``cut_after``)
        self._cut_at: int | None = None
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target_path)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b, count in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, count), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(1 << 16)
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                cut_at = self._cut_at if count else None
                if cut_at is not None and self.forwarded + n >= cut_at:
                    dst.sendall(memoryview(buf)[:cut_at - self.forwarded])
                    self.forwarded = cut_at
                    self.cut()
                    return
                dst.sendall(memoryview(buf)[:n])
                if count:
                    self.forwarded += n
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut_after(self, n: int) -> None:
        """Forward ``n`` more bytes of the source's stream, then cut (a link lost in the middle of a transfer)."""
        self._cut_at = self.forwarded + n

    def cut(self) -> None:
        """Break every connection forwarded so far: both ends see a reset, as when a link goes down."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._server.close()
        self.cut()
        with contextlib.suppress(OSError):
            Path(self.listen_path).unlink()
