"""``rdma:HOST:PORT`` over ZeroMQ: QEMU's rdma address type, carried by ZMTP over TCP.

The destination binds one ROUTER socket; every source connection (the main
channel and, as mig's extension, multifd channels) is a DEALER with its own
routing id, so one listener accepts any number of channels and each keeps a
return path. Page data leaves with ``copy=False`` frames straight from RAM
(ZeroMQ's I/O thread sends them; nothing is joined or copied in Python).
ZeroMQ hides connection loss, so each socket has a monitor: a disconnect (or
missed ZMTP heartbeats on a stalled peer) fails the channel instead of
blocking forever.

ZeroMQ also drops what a connection delivered but the socket's owner had not
read yet once the peer disconnects (a DEALER that does not reconnect loses it
at once). So a channel's end is a handshake, as TCP's FIN is: a closed (or
finished) channel sends an end-of-stream message, the peer's pump acknowledges
it once everything before it is in the channel's inbox, and a pump closes its
socket only when each of its channels was acknowledged, the peer went, or the
linger time ran out.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from mig_core.ext.channel import Buffer, Channel, ChannelAbilities, ChannelAborted, ChannelError
from mig_core.ext.transport import Listener, Transport, TransportError, split_host_port
from mig_core.qapi import UNSET
from mig_core.schema.migration import MigrationAddress, MigrationAddressType
from mig_core.schema.sockets import InetSocketAddress, SocketAddress

__all__ = ["ZmqTransport", "parse_rdma_uri"]

log = structlog.get_logger("mig.transport.zmq")

#: frames at least this big go out zero-copy (smaller ones are cheaper to copy, as pyzmq advises)
ZERO_COPY_MIN = 64 << 10
#: messages queued per connection before a send waits (bounds memory like a socket buffer)
HWM = 64
_POLL_MS = 100
#: How long connect waits for the destination to answer.
CONNECT_TIMEOUT_S = 10.0
_ids = itertools.count(1)


#: InetSocketAddress members the ZeroMQ transport cannot honour (refused rather than ignored).
UNSUPPORTED_OPTIONS = ("numeric", "to", "ipv4", "ipv6", "keep-alive", "keep-alive-count", "keep-alive-idle",
                       "keep-alive-interval", "mptcp")


def parse_rdma_uri(uri: str) -> InetSocketAddress:
    """``rdma:HOST:PORT`` or ``rdma:[V6]:PORT`` (QEMU parses it with inet_parse; no options)."""
    try:
        host, port = split_host_port(uri.partition(":")[2])
    except ValueError as e:
        raise TransportError(str(e)) from None
    return InetSocketAddress(host=host, port=str(port))


def _endpoint(v: InetSocketAddress, bind: bool) -> str:
    host = v.host or ("*" if bind else "127.0.0.1")
    if ":" in host:
        host = f"[{host}]"
    port = "*" if bind and v.port == "0" else v.port
    return f"tcp://{host}:{port}"


def _tune(sock: zmq.Socket, user_timeout: float) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.IPV6, 1)
    # ZMTP heartbeats: a peer that stops answering counts as gone (like TCP_USER_TIMEOUT on sockets)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(user_timeout * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(user_timeout * 1000))


class ZmqChannel(Channel):
    """One channel: sends are multipart messages, receives a byte stream over the frames that arrived."""

    abilities = ChannelAbilities(multiple_channels=True, return_path=True, zero_copy=True)

    def __init__(self, pump: _Pump, ident: bytes) -> None:
        super().__init__()
        self._pump, self._ident = pump, ident
        self._inbox = pump.inbox(ident)
        # a private inproc socket into the pump (ZeroMQ sockets belong to one thread at a time)
        pump.hold()
        self._push = pump.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, HWM)
        self._push.setsockopt(zmq.LINGER, -1)
        self._push.connect(pump.inproc)
        self._current = memoryview(b"")
        self._finished = self._eof = False

    def _gone(self) -> str | None:
        return self._pump.gone_for(self._ident)

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        frames = [memoryview(b).cast("B") for b in buffers]
        while True:
            self._check_abort()
            gone = self._gone()
            if gone:
                raise ChannelError(f"send failed: {gone}")
            if self._push.poll(_POLL_MS, zmq.POLLOUT):
                break
        parts = [self._ident, *frames]
        for i, f in enumerate(parts):
            self._push.send(f, zmq.SNDMORE if i < len(parts) - 1 else 0, copy=len(f) < ZERO_COPY_MIN)
        return sum(f.nbytes for f in frames)

    def _recv_into(self, view: memoryview) -> int:
        while not self._current.nbytes:
            self._check_abort()
            if self._eof:
                return 0
            try:
                got = self._inbox.get(timeout=_POLL_MS / 1000)
            except queue.Empty:
                if self._gone() and self._inbox.empty():
                    return 0  # the peer went away without ending the stream (the reader calls it truncated)
                continue
            if got is None:  # the peer's end-of-stream: everything it sent is in
                self._eof = True
                return 0
            self._current = got
        n = min(view.nbytes, self._current.nbytes)
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def _unblock(self) -> None:
        pass  # every wait polls with a timeout and checks the abort flag

    def finish(self) -> None:
        """Half-close: the peer reads the end of this direction after everything sent (replies may follow)."""
        if not self._finished and not self._push.closed:
            self._finished = True
            self._push.send_multipart([self._ident, b"", _EOS])

    def close(self) -> None:
        if self._push.closed:
            return
        # ordered after this channel's data: the pump forwards everything before it lets the channel go;
        # only a channel aborted before it finished is dropped at once (as a reset connection), any other
        # is delivered (the engine aborts every channel when a migration ends, finished ones included)
        marker = _ABORT if self.abort_reason is not None and not self._finished else _CLOSE
        self._push.send_multipart([self._ident, b"", marker])
        self._push.close()
        self._pump.release()


# Control messages start with an empty frame, which no data message has (sendv drops empty buffers):
# between a channel and its pump, and between the two pumps (end of stream and its acknowledgement).
_CLOSE = b"close"
_ABORT = b"abort"
_EOS = b"eos"
_EOS_ACK = b"eos-ack"


class _Pump:
    """Owns one network socket (DEALER or ROUTER) in its own thread: forwards what channels queue on an
    inproc socket, sorts what arrives into per-channel inboxes, and watches for disconnects."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, router: bool, graceful_linger_ms: int) -> None:
        self.ctx, self.sock, self.router = ctx, sock, router
        # the context ends once the pump and every channel's socket are gone (see release)
        self._holders = 1
        self._holders_lock = threading.Lock()
        self.linger_ms = graceful_linger_ms
        self.inproc = f"inproc://mig-zmq-{os.getpid()}-{next(_ids)}"
        self._pull = ctx.socket(zmq.PULL)
        self._pull.bind(self.inproc)
        # a unique monitor endpoint: pyzmq's default is named after the socket's descriptor, which the next
        # socket may reuse while the closed one's endpoint is still bound (its connection then goes unseen)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                               | zmq.EVENT_CLOSED,
                                               addr=f"inproc://mig-zmq-monitor-{os.getpid()}-{next(_ids)}")
        self.connected = self.closed_events = 0
        self.gone: str | None = None  # a DEALER's one connection went, or the socket failed
        self._fds: dict[bytes, int] = {}  # ROUTER: each peer's connection, to tell whose disconnect it was
        self._gone_fds: set[int] = set()
        self._inboxes: dict[bytes, queue.SimpleQueue] = {}
        self.new: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.accepting = True
        self._open: set[bytes] = set()
        self._unacked: set[bytes] = set()  # channels whose end-of-stream the peer has not acknowledged yet
        self._ended: set[bytes] = set()  # channels that sent their end-of-stream
        self._linger_until: float | None = None
        self._graceful = True
        self._thread = threading.Thread(target=self._run, name="mig/zmq", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def gone_for(self, ident: bytes) -> str | None:
        if self.gone:
            return self.gone
        fd = self._fds.get(ident)
        return "the source closed the connection" if fd is not None and fd in self._gone_fds else None

    def inbox(self, ident: bytes) -> queue.SimpleQueue:
        self._open.add(ident)
        return self._inboxes.setdefault(ident, queue.SimpleQueue())

    def _events(self) -> None:
        while self.monitor.poll(0):
            msg = recv_monitor_message(self.monitor)
            ev = msg["event"]
            if ev in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self.connected += 1
            elif ev == zmq.EVENT_DISCONNECTED:
                if self.router:
                    self._gone_fds.add(int(msg["value"]))
                else:
                    self.gone = "the destination closed the connection"
            elif ev == zmq.EVENT_CLOSED:
                self.closed_events += 1

    def _done(self) -> bool:
        """Stop once no channel is open and each ended one was acknowledged, its peer went, or linger ran out."""
        if self._open or self.accepting:
            return False
        self._unacked = {i for i in self._unacked if not self.gone_for(i)}
        if self._unacked and self._linger_until is None:
            self._linger_until = time.monotonic() + self.linger_ms / 1000
        if self._unacked and time.monotonic() < (self._linger_until or 0):
            return False
        if self._unacked:
            log.warning("zmq_end_not_acknowledged", channels=len(self._unacked))
        return True

    def _run(self) -> None:
        pending: list | None = None  # a message the network socket could not take yet
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._done():
                events = dict(poller.poll(_POLL_MS))
                if self.monitor in events:
                    self._events()
                if events.get(self.sock, 0) & zmq.POLLIN:
                    self._receive()
                if pending is not None and self.gone_for(pending[0].bytes):
                    pending = None  # nobody left to take it
                if pending is not None and events.get(self.sock, 0) & zmq.POLLOUT:
                    pending = self._forward(pending)
                elif pending is None and self._pull in events:
                    pending = self._forward(self._pull.recv_multipart(copy=False))
                # while a message waits, stop taking more from the channels and wait for room instead
                poller.modify(self.sock, zmq.POLLIN | (zmq.POLLOUT if pending is not None else 0))
                poller.modify(self._pull, 0 if pending is not None else zmq.POLLIN)
        finally:
            self.monitor.close(0)
            self._pull.close(0)
            self.sock.close(self.linger_ms if self._graceful else 0)
            self.release()

    def hold(self) -> None:
        """A channel made a socket in this pump's context: the context lives until it is released."""
        with self._holders_lock:
            self._holders += 1

    def release(self) -> None:
        """The pump or a channel is done with the context; the last one ends it, off this thread (a socket
        closed with data still lingering keeps ``term`` waiting for up to its linger time)."""
        with self._holders_lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            threading.Thread(target=self.ctx.term, name="mig/zmq-term", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                parts = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            ident = parts[0].bytes if self.router else b""
            frames = parts[1:] if self.router else parts
            if len(frames) == 2 and not frames[0].bytes:
                self._control(ident, frames[1].bytes)
                continue
            box = self._inboxes.get(ident)
            if box is None:
                if not self.accepting:
                    log.warning("zmq_extra_connection_ignored")
                    continue
                box = self._inboxes[ident] = queue.SimpleQueue()
                if self.router:
                    self._fds[ident] = int(parts[0].get(zmq.SRCFD))
                self.new.put(ident)
            for f in frames:
                box.put(f.buffer)

    def _control(self, ident: bytes, what: bytes) -> None:
        """The peer's end-of-stream (queue the end for the reader, acknowledge it) or its acknowledgement."""
        if what == _EOS:
            box = self._inboxes.get(ident)
            if box is not None:
                box.put(None)
            self._send_control(ident, _EOS_ACK)
        elif what == _EOS_ACK:
            self._unacked.discard(ident)

    def _send_control(self, ident: bytes, what: bytes) -> bool:
        """Send a control message to the peer of ``ident``; False if there is no room for it now."""
        out = [ident, b"", what] if self.router else [b"", what]
        try:
            self.sock.send_multipart(out, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError:  # the peer is gone: nobody to tell
            pass
        return True

    def _end(self, ident: bytes) -> bool:
        """This channel's end-of-stream goes to the peer after its data; False if it must wait for room."""
        if ident in self._ended or self.gone_for(ident):
            return True
        if not self._send_control(ident, _EOS):
            return False
        self._ended.add(ident)
        self._unacked.add(ident)
        return True

    def _forward(self, parts: list) -> list | None:
        """Send one queued message on the network socket; return it if it must wait for room."""
        ident = parts[0].bytes
        if len(parts) == 3 and not parts[1].bytes:  # a channel's own control message
            what = parts[2].bytes
            if what in (_EOS, _CLOSE) and not self._end(ident):
                return parts
            if what in (_CLOSE, _ABORT):
                self._open.discard(ident)
            if what == _ABORT:
                self._graceful = False
                self._unacked.discard(ident)
            return None
        out = parts if self.router else parts[1:]
        try:
            self.sock.send(out[0], zmq.SNDMORE | zmq.NOBLOCK, copy=False) if len(out) > 1 else \
                self.sock.send(out[0], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return parts
        except zmq.ZMQError as e:  # e.g. ROUTER_MANDATORY: the peer is gone
            self.gone = f"the peer is unreachable: {e.strerror}"
            return None
        for i, f in enumerate(out[1:], 1):  # once the first frame is taken, the rest always is
            self.sock.send(f, zmq.SNDMORE if i < len(out) - 1 else 0, copy=False)
        return None

    def stop_accepting(self) -> None:
        """No new channels: the pump ends once the ones it has are closed and their ends acknowledged."""
        self.accepting = False
        if not self._open and not self._ended:
            self._graceful = False  # nothing was ever delivered on it

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _ZmqListener(Listener):
    """The destination: one ROUTER in a pump; each new routing id is one accepted channel."""

    def __init__(self, ctx: zmq.Context, v: InetSocketAddress, user_timeout: float) -> None:
        sock = ctx.socket(zmq.ROUTER)
        _tune(sock, user_timeout)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer is an error, not a drop
        try:
            sock.bind(_endpoint(v, bind=True))
        except zmq.ZMQError as e:
            sock.close(0)
            ctx.term()
            raise TransportError(f"Failed to bind socket: {e.strerror}") from None
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        self._address = SocketAddress("inet", InetSocketAddress(host=host.strip("[]"), port=port))
        self.pump = _Pump(ctx, sock, router=True, graceful_linger_ms=int(user_timeout * 1000))
        self.pump.start()
        self._closed = False

    @property
    def socket_addresses(self) -> list[SocketAddress]:
        return [self._address]

    def accept(self) -> Channel:
        while True:
            if self._closed:
                raise ChannelAborted("the listener was closed")
            try:
                ident = self.pump.new.get(timeout=_POLL_MS / 1000)
                return ZmqChannel(self.pump, ident)
            except queue.Empty:
                continue

    def close(self) -> None:
        """No new channels; those handed out keep the socket until they are closed. (The endpoint is not
        unbound, which would cut the connections it accepted; messages from new peers are ignored.)"""
        self._closed = True
        self.pump.stop_accepting()


class ZmqTransport(Transport):
    """``rdma``: ``rdma:HOST:PORT`` or ``{"transport": "rdma", "host": ..., "port": ...}`` over ZeroMQ."""

    address_type = MigrationAddressType.RDMA.value
    uri_schemes = ("rdma",)
    abilities = ChannelAbilities(multiple_channels=True, return_path=True, zero_copy=True)

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        return MigrationAddress("rdma", parse_rdma_uri(uri))

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        """The channels form carries InetSocketAddress's options; ZeroMQ applies none of them."""
        v: InetSocketAddress = addr.value
        for name in UNSUPPORTED_OPTIONS:
            if getattr(v, name.replace("-", "_")) is not UNSET:
                raise TransportError(f"rdma: option '{name}' is not supported by the ZeroMQ transport")

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        v: InetSocketAddress = addr.value
        what = f"{v.host}:{v.port}"
        ctx = zmq.Context()  # one per connection (see listen)
        sock = ctx.socket(zmq.DEALER)
        _tune(sock, self.ctx.user_timeout)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a finished connection
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # a lost destination is lost: no silent reconnect
        pump = _Pump(ctx, sock, router=False, graceful_linger_ms=int(self.ctx.user_timeout * 1000))
        sock.connect(_endpoint(v, bind=False))
        pump.accepting = False
        channel = ZmqChannel(pump, b"")
        pump.start()
        try:
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while not pump.connected:
                if pump.closed_events:  # refused, and no reconnection is attempted
                    raise TransportError(f"Failed to connect to '{what}': Connection refused")
                if abort_check():
                    raise ChannelAborted("connect cancelled")
                if time.monotonic() >= deadline:
                    raise TransportError(f"Failed to connect to '{what}': no answer within "
                                         f"{CONNECT_TIMEOUT_S:g} s")
                time.sleep(_POLL_MS / 1000 / 10)
        except BaseException:
            channel.close()
            raise
        log.info("zmq_connected", endpoint=what)
        return channel

    def listen(self, addr: MigrationAddress) -> Listener:
        # a context per listener and per connection: with one shared context, a connection made after an
        # earlier one had been closed on the destination side sometimes never completed
        return _ZmqListener(zmq.Context(), addr.value, self.ctx.user_timeout)
