"""Channels: what a transport hands the stream layer, with the abilities it declares.

A channel moves bytes in order. It may support several channels per migration
(multifd), a return path, zero-copy sends (then ``flush_zero_copy`` must be
called before reusing buffers), positioned writes (files). Every channel can
be aborted from another thread, which unblocks a stuck send or receive at
once. ``SocketChannel`` wraps any connected stream socket, ``FdChannel`` a
pair of file descriptors; channels over memory are in ``memory_channel``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mig_core.errors import ChannelAborted, ChannelEOF, ChannelError

__all__ = ["Buffer", "Channel", "ChannelAbilities", "ChannelAborted", "ChannelEOF", "ChannelError", "FdChannel",
           "SocketChannel"]

Buffer = Any  # bytes, bytearray, memoryview or a contiguous numpy array

# Linux zero-copy send (MSG_ZEROCOPY, Documentation/networking/msg_zerocopy.rst)
_SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
_MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
_SO_EE_ORIGIN_ZEROCOPY = 5
_SO_EE_CODE_ZEROCOPY_COPIED = 1
#: struct sock_extended_err: errno, origin, type, code, pad, info, data
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_RECVERR = {(socket.SOL_IP, getattr(socket, "IP_RECVERR", 11)),
            (socket.IPPROTO_IPV6, getattr(socket, "IPV6_RECVERR", 25))}

#: Bytes of zero-copy sends a channel lets the kernel hold before it waits for completions.
ZERO_COPY_PIN_LIMIT = 64 << 20

#: Linux limits one sendmsg to IOV_MAX buffers.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from a list of buffers (what a partial write took)."""
    while n and views:
        if n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


@dataclass(frozen=True)
class ChannelAbilities:
    """What a channel (and its transport) can do."""

    multiple_channels: bool = False
    return_path: bool = False
    zero_copy: bool = False
    positioned: bool = False


class Channel(ABC):
    """An ordered byte channel; subclasses implement the primitive operations."""

    abilities: ChannelAbilities = ChannelAbilities()

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.abort_reason: str | None = None
        self._ra = memoryview(bytearray(self.readahead))
        self._ra_pos = self._ra_end = 0

    # -- sending -----------------------------------------------------------------

    @abstractmethod
    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        """Send as much of ``buffers`` as possible in one call; return the byte count."""

    def sendv(self, buffers: Sequence[Buffer]) -> None:
        """Send every byte of ``buffers``, in order (scatter-gather, no joining copy)."""
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        while views:
            self._check_abort()
            n = self._sendv(views[:IOV_MAX])
            self.bytes_sent += n
            _consume(views, n)

    def send(self, data: Buffer) -> None:
        self.sendv([data])

    def enable_zero_copy(self) -> None:
        """Switch on zero-copy sends; ChannelError if this channel or the kernel cannot."""
        raise ChannelError("Zero copy send feature not detected in host kernel")

    def sendv_zero_copy(self, buffers: Sequence[Buffer]) -> None:
        """Like sendv, but the kernel may keep referring to ``buffers`` until ``flush_zero_copy``."""
        self.sendv(buffers)

    def flush_zero_copy(self) -> bool:
        """Wait until the kernel no longer needs buffers passed to zero-copy sends.

        Returns True if the kernel had to copy some of them after all (so zero copy was missed).
        """
        return False

    def finish(self) -> None:
        """Everything is written: make sure it was delivered (e.g. a child's exit status); raise if not."""

    def close_write(self) -> None:
        """Tell the peer nothing more will be sent (TLS: close_notify) while still receiving; else nothing."""

    # -- receiving -----------------------------------------------------------------

    @abstractmethod
    def _recv_into(self, view: memoryview) -> int:
        """Receive up to ``len(view)`` bytes; 0 means end of stream."""

    #: a read smaller than this is served from one kernel read of up to this many bytes (0 = never):
    #: a run of small records (return-path messages, device state) then costs one receive call
    readahead: int = 0

    def read_in_bulk(self) -> None:
        """Read exactly what is asked from now on, for channels of page data: reading ahead there copied the
        start of each payload twice (issue 21). What was read ahead is still served first."""
        self.readahead = 0

    def recv_into(self, buf: Buffer) -> None:
        """Fill ``buf`` completely or raise ChannelEOF / ChannelAborted."""
        view = memoryview(buf).cast("B")
        got = 0
        try:
            while got < view.nbytes:
                ahead = self._ra_end - self._ra_pos
                if ahead:
                    take = min(view.nbytes - got, ahead)
                    view[got:got + take] = self._ra[self._ra_pos:self._ra_pos + take]
                    self._ra_pos += take
                    got += take
                    continue
                self._check_abort()
                small = view.nbytes - got < self.readahead
                n = self._recv_into(self._ra if small else view[got:])
                if n == 0:
                    self._check_abort()
                    raise ChannelEOF(f"the stream ended {view.nbytes - got} bytes early (wanted {view.nbytes})")
                if small:
                    self._ra_pos, self._ra_end = 0, n
                else:
                    got += n
        finally:
            self.bytes_received += got

    def recv_some(self, buf: Buffer) -> int:
        """Up to ``len(buf)`` bytes as they arrive (the read-ahead first); 0 at the end of the stream.
        For pumps that forward a stream without knowing its framing (the TLS relay)."""
        view = memoryview(buf).cast("B")
        ahead = self._ra_end - self._ra_pos
        if ahead:
            take = min(view.nbytes, ahead)
            view[:take] = self._ra[self._ra_pos:self._ra_pos + take]
            self._ra_pos += take
        else:
            self._check_abort()
            take = self._recv_into(view)
        self.bytes_received += take
        return take

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(buf)
        return bytes(buf)

    # -- handing the connection to another process ------------------------------------------

    def fileno(self) -> int:
        """The descriptor another process can carry on this connection with (postcopy's helper); -1 if none."""
        return -1

    def take_buffered(self) -> bytes:
        """The bytes read ahead from the kernel but not consumed yet (whoever continues the stream needs them)."""
        data = bytes(self._ra[self._ra_pos:self._ra_end])
        self._ra_pos = self._ra_end = 0
        return data

    def preload(self, data: bytes) -> None:
        """Make ``data`` the next bytes this channel returns (what another reader took over with the descriptor)."""
        if not data:
            return
        if self._ra_end - self._ra_pos:
            raise ChannelError("preload: the channel already holds unread bytes")
        if len(data) > len(self._ra):
            self._ra = memoryview(bytearray(len(data)))
        self._ra[:len(data)] = data
        self._ra_pos, self._ra_end = 0, len(data)

    # -- positioned I/O (file transports) -------------------------------------------------

    @property
    def seekable(self) -> bool:
        """Whether this channel is a file it can seek in (mapped-ram needs one); the others raise."""
        return False

    def tell(self) -> int:
        """The current offset of the sequential stream in the file."""
        raise ChannelError(f"{type(self).__name__} cannot seek")

    def seek(self, offset: int) -> None:
        """Continue the sequential stream at ``offset`` (mapped-ram: after the RAM regions)."""
        raise ChannelError(f"{type(self).__name__} cannot seek")

    def size(self) -> int:
        """The file's size in bytes."""
        raise ChannelError(f"{type(self).__name__} is not a file")

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        raise ChannelError(f"{type(self).__name__} has no positioned writes")

    def preadv_into(self, buf: Buffer, offset: int) -> None:
        raise ChannelError(f"{type(self).__name__} has no positioned reads")

    # -- lifecycle -----------------------------------------------------------------

    def abort(self, reason: str = "aborted") -> None:
        """Make every pending and future operation fail with ChannelAborted; callable from any thread."""
        if self.abort_reason is None:
            self.abort_reason = reason
        self._unblock()

    @abstractmethod
    def _unblock(self) -> None: ...

    def _check_abort(self) -> None:
        if self.abort_reason is not None:
            raise ChannelAborted(self.abort_reason)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketChannel(Channel):
    """A connected stream socket (tcp, unix, vsock, a socketpair); abort shuts it down."""

    abilities = ChannelAbilities(multiple_channels=True, return_path=True)
    readahead = 64 << 10

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setblocking(True)
        self.sock = sock
        self._zero_copy = False
        #: id the kernel gives the next zero-copy send (it counts them from 0, wrapping at 2**32)
        self._zc_next = 0
        #: zero-copy sends not completed yet: id -> (their bytes, the buffers the kernel may still read)
        self._zc_pinned: dict[int, tuple[int, list[memoryview]]] = {}
        self._zc_pinned_bytes = 0
        self._zc_copied = False

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        try:
            return self.sock.sendmsg(buffers)
        except OSError as e:
            self._check_abort()
            raise ChannelError(f"send failed: {e.strerror or e}") from None

    def _recv_into(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
        except OSError as e:
            self._check_abort()
            raise ChannelError(f"receive failed: {e.strerror or e}") from None

    def enable_zero_copy(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_ZEROCOPY, 1)
        except OSError:
            raise ChannelError("Zero copy send feature not detected in host kernel") from None
        self._zero_copy = True

    @property
    def zero_copy_pending(self) -> list[int]:
        """Ids of zero-copy sends whose completion has not been read yet (their buffers are held)."""
        return sorted(self._zc_pinned)

    def sendv_zero_copy(self, buffers: Sequence[Buffer]) -> None:
        """Send with MSG_ZEROCOPY; every buffer stays referenced until the kernel reports the send done.

        The kernel reads the pages of a zero-copy send after the call returns, until its completion
        arrives on the error queue; a buffer freed before that (a gathered copy, a tracker's page
        copy) could be reused and other data put on the wire.
        """
        if not self._zero_copy:
            self.sendv(buffers)
            return
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        while views:
            self._check_abort()
            batch = views[:IOV_MAX]
            try:
                n = self.sock.sendmsg(batch, [], _MSG_ZEROCOPY)
            except OSError as e:
                self._check_abort()
                if e.errno == errno.ENOBUFS:  # too many notifications outstanding: collect them, retry
                    self._reap()
                    continue
                raise ChannelError(f"send failed: {e.strerror or e}") from None
            if n:
                size = sum(v.nbytes for v in batch)
                self._zc_pinned[self._zc_next] = (size, batch)
                self._zc_pinned_bytes += size
                self._zc_next = (self._zc_next + 1) & 0xFFFFFFFF
            self.bytes_sent += n
            _consume(views, n)
        if self._zc_pinned_bytes > ZERO_COPY_PIN_LIMIT:  # else completions are read at the next flush
            self._reap(until_bytes=ZERO_COPY_PIN_LIMIT)

    def flush_zero_copy(self) -> bool:
        """Read completion notifications from the error queue until every zero-copy send is done."""
        self._reap()
        copied, self._zc_copied = self._zc_copied, False
        return copied

    def _reap(self, until_bytes: int = 0) -> None:
        """Read completions, releasing each completed send's buffers, until the pinned bytes are at most
        ``until_bytes`` (0: every send completed)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLERR)
        while self._zc_pinned:
            self._check_abort()
            try:
                _, ancdata, _, _ = self.sock.recvmsg(0, 256, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self._zc_pinned_bytes <= until_bytes:
                    return
                poller.poll(100)
                continue
            except OSError as e:
                self._check_abort()
                raise ChannelError(f"zero-copy completion failed: {e.strerror or e}") from None
            for level, kind, data in ancdata:
                if (level, kind) not in _RECVERR or len(data) < _EXTENDED_ERR.size:
                    continue
                err, origin, _type, code, _pad, lo, hi = _EXTENDED_ERR.unpack_from(data)
                if origin != _SO_EE_ORIGIN_ZEROCOPY:
                    raise ChannelError(f"send failed: {os.strerror(err) if err else 'error queue message'}")
                for i in range((hi - lo + 1) & 0xFFFFFFFF):  # ids lo..hi, inclusive, wrapping
                    done = self._zc_pinned.pop((lo + i) & 0xFFFFFFFF, None)
                    if done is not None:
                        self._zc_pinned_bytes -= done[0]
                if code & _SO_EE_CODE_ZEROCOPY_COPIED:
                    self._zc_copied = True

    def _unblock(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class FdChannel(Channel):
    """A pipe or file descriptor pair (write end, read end; either may be -1); abort wakes a blocked call."""

    abilities = ChannelAbilities()

    def __init__(self, write_fd: int = -1, read_fd: int = -1) -> None:
        super().__init__()
        self.write_fd, self.read_fd = write_fd, read_fd
        for fd in (write_fd, read_fd):
            if fd >= 0:
                os.set_blocking(fd, False)
        self._wake_r, self._wake_w = os.pipe()

    def _wait(self, fd: int, writing: bool) -> None:
        poller = select.poll()  # not select(): descriptors may be numbered above 1024
        poller.register(fd, select.POLLOUT if writing else select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        for ready, _ev in poller.poll():
            if ready == self._wake_r:
                self._check_abort()

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        if self.write_fd < 0:
            raise ChannelError("this channel cannot send")
        while True:
            try:
                return os.writev(self.write_fd, buffers)
            except BlockingIOError:
                self._wait(self.write_fd, writing=True)
            except OSError as e:
                self._check_abort()
                raise ChannelError(f"send failed: {e.strerror or e}") from None

    def _recv_into(self, view: memoryview) -> int:
        if self.read_fd < 0:
            raise ChannelError("this channel cannot receive")
        while True:
            try:
                return os.readv(self.read_fd, [view])
            except BlockingIOError:
                self._wait(self.read_fd, writing=False)
            except OSError as e:
                self._check_abort()
                raise ChannelError(f"receive failed: {e.strerror or e}") from None

    def _unblock(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # positioned I/O: regular files (mapped-ram); never blocks, so no abort wake-up is needed
    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
        while views:
            self._check_abort()
            try:
                n = os.pwritev(self.write_fd, views[:IOV_MAX], offset)
            except OSError as e:
                raise ChannelError(f"write at offset {offset} failed: {e.strerror or e}") from None
            self.bytes_sent += n
            offset += n
            _consume(views, n)

    def preadv_into(self, buf: Buffer, offset: int) -> None:
        view = memoryview(buf).cast("B")
        got = 0
        fd = self.read_fd if self.read_fd >= 0 else self.write_fd
        while got < view.nbytes:
            self._check_abort()
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError as e:
                raise ChannelError(f"read at offset {offset + got} failed: {e.strerror or e}") from None
            if n == 0:
                raise ChannelEOF(f"the file ended at byte {offset + got}, {view.nbytes - got} bytes early")
            got += n
            self.bytes_received += n

    @property
    def _fd(self) -> int:
        return self.write_fd if self.write_fd >= 0 else self.read_fd

    @property
    def seekable(self) -> bool:
        """A regular file (or block device) is; a pipe, a FIFO, a socket or a terminal is not."""
        try:
            os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:
            return False
        return True

    def tell(self) -> int:
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError as e:
            raise ChannelError(f"cannot seek: {e.strerror}") from None

    def seek(self, offset: int) -> None:
        try:
            os.lseek(self._fd, offset, os.SEEK_SET)
        except OSError as e:
            raise ChannelError(f"cannot seek to {offset}: {e.strerror}") from None

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        for fd in (self.write_fd, self.read_fd, self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.write_fd = self.read_fd = self._wake_r = self._wake_w = -1
