"""A TLS session over any mig channel: OpenSSL through Python's ``ssl`` memory BIOs.

The session never touches a descriptor: ciphertext moves through the wrapped channel's own send and
receive, so TLS works over every transport (a socket, a child's pipes, a passed descriptor), and the
wrapped channel's abort still unblocks a stuck call. One thread may send while another receives (the
return path): OpenSSL's object is used under a lock held only while it encrypts or decrypts, and the
ciphertext leaves under a second lock, so records go out in the order they were made.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from typing import cast

from mig_core.errors import ChannelError
from mig_core.ext.channel import Buffer, Channel, ChannelAbilities

#: Plaintext encrypted per record batch: large enough to amortise the calls, small enough to stay in cache.
SEND_CHUNK = 256 << 10
#: Ciphertext read from the wrapped channel per receive call.
RECV_CHUNK = 256 << 10


class TlsChannel(Channel):
    """``inner`` wrapped in a TLS session that ``handshake`` establishes before any data moves."""

    readahead = 64 << 10

    def __init__(self, inner: Channel, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        super().__init__()
        self.inner = inner
        self.abilities = ChannelAbilities(multiple_channels=inner.abilities.multiple_channels,
                                          return_path=inner.abilities.return_path)
        self._ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._recv_buf = bytearray(RECV_CHUNK)
        self._write_closed = False  # close_notify sent: nothing more leaves (an alert about our own EOF included)
        self._failed: str | None = None  # a receive error held back until the bytes before it were delivered

    # -- the handshake ------------------------------------------------------------------------

    def handshake(self, describe: Callable[[ssl.SSLError], str]) -> None:
        """Run the TLS handshake to its end; ChannelError with ``describe(error)`` if OpenSSL refuses."""
        while True:
            try:
                with self._ssl_lock:
                    self._ssl.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLError as e:
                self._flush_quietly()  # the alert tells the peer why
                raise ChannelError(describe(e)) from None

    def read_plain(self, n: int, describe: Callable[[ssl.SSLError], str]) -> bytes:
        """Exactly ``n`` bytes of plaintext, an alert the peer sent becoming ``describe(error)``."""
        got = b""
        while len(got) < n:
            try:
                with self._ssl_lock:
                    piece = self._ssl.read(n - len(got))
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                piece = b""
            except ssl.SSLError as e:
                raise ChannelError(describe(e)) from None
            if not piece:
                raise ChannelError("TLS handshake failed: the peer closed the connection")
            got += piece
        return got

    @property
    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), if it sent one."""
        return self._ssl.getpeercert(binary_form=True)

    # -- ciphertext to and from the wrapped channel ------------------------------------------

    def _flush(self) -> None:
        with self._send_lock:
            with self._ssl_lock:
                data = self._out.read()
            if data and not self._write_closed:
                self.inner.send(data)

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except (ChannelError, OSError):
            pass

    def _fill(self) -> None:
        """Move the next ciphertext the wrapped channel has into OpenSSL's input."""
        self._check_abort()
        view = memoryview(self._recv_buf)
        n = self.inner._recv_into(view)
        if n == 0:
            with self._ssl_lock:
                self._in.write_eof()
            return
        with self._ssl_lock:
            self._in.write(view[:n])

    # -- Channel ---------------------------------------------------------------------------------

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        total = 0
        with self._send_lock:
            if self._write_closed:
                raise ChannelError("TLS send failed: this end already closed the session for sending")
            for buf in buffers:
                view = memoryview(buf).cast("B")
                for start in range(0, view.nbytes, SEND_CHUNK):
                    piece = view[start:start + SEND_CHUNK]
                    try:
                        with self._ssl_lock:
                            self._ssl.write(piece)
                            data = self._out.read()
                    except ssl.SSLError as e:
                        raise ChannelError(f"TLS send failed: {e.reason or e}") from None
                    self.inner.send(data)
                    total += piece.nbytes
        return total

    def _recv_into(self, view: memoryview) -> int:
        if self._failed is not None:
            raise ChannelError(self._failed)
        # OpenSSL hands out one record (at most 16 KiB) per read: take every record already decrypted-ready
        # under one lock, so a large read costs one Python round per record, not one per call
        while True:
            got = 0
            try:
                with self._ssl_lock:
                    try:
                        while got < view.nbytes:
                            k = cast(int, self._ssl.read(view.nbytes - got, view[got:]))  # with a buffer: a count
                            if not k:  # the peer's close_notify: the end of the stream
                                break
                            got += k
                    finally:
                        pending = self._out.pending
            except ssl.SSLWantReadError:
                if not got:
                    self._fill()
                    continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # the peer closed the session (cleanly or not)
                if not got:
                    return 0
            except ssl.SSLError as e:
                self._check_abort()
                if e.reason in _ALTERED:
                    reason = ("TLS receive failed: a record failed its authentication (bad record MAC): "
                              "the data were altered on the way")
                else:
                    reason = f"TLS receive failed: {e.reason or e}"
                if not got:
                    raise ChannelError(reason) from None
                self._failed = reason  # the records before the error are the peer's data: deliver them first
            if pending:  # a post-handshake message wants an answer (a key update)
                self._flush()
            return got

    def finish(self) -> None:
        self.inner.finish()

    def _unblock(self) -> None:
        self.inner.abort(self.abort_reason or "aborted")

    def close_write(self) -> None:
        """Say goodbye (close_notify) and send nothing after it, while still receiving what the peer sends.

        Whatever OpenSSL queues later stays here: an end of stream that this side caused by shutting its
        own receive side would otherwise go out as a ``decode_error`` alert, after data the peer is still reading.
        """
        with self._send_lock:
            if self._write_closed:
                return
            self._write_closed = True
            with self._ssl_lock:
                try:
                    self._ssl.unwrap()
                except (ssl.SSLError, ValueError):
                    pass  # close_notify is queued; the peer's answer is not awaited
                data = self._out.read()
            try:
                if data:
                    self.inner.send(data)
            except (ChannelError, OSError):
                pass  # the peer is gone: nobody to say goodbye to

    def close(self) -> None:
        """Say goodbye (close_notify) where the peer still listens, then close the wrapped channel."""
        if self.abort_reason is None:
            self.close_write()
        self.inner.close()


#: OpenSSL's reasons for a record whose authentication tag does not match
_ALTERED = frozenset({"DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_MAC", "DECRYPTION_FAILED"})
