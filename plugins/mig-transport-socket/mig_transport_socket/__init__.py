"""The socket migration transport: tcp, unix, fd and vsock, in URIs and in the channels form."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
from collections.abc import Callable
from typing import Any

import structlog

from mig_core.ext.channel import Channel, ChannelAbilities, ChannelAborted, SocketChannel
from mig_core.ext.transport import (
    Listener,
    SingleChannelListener,
    Transport,
    TransportError,
    partition_host_port,
)
from mig_core.qapi import UNSET
from mig_core.schema.migration import MigrationAddress, MigrationAddressType
from mig_core.schema.sockets import (
    InetSocketAddress,
    SocketAddress,
    SocketAddressType,
    String,
    UnixSocketAddress,
    VsockSocketAddress,
)

__all__ = ["SocketTransport", "parse_socket_uri"]

log = structlog.get_logger("mig.transport.socket")

_BOOL_OPTS = {"ipv4", "ipv6", "numeric", "keep-alive", "mptcp"}
_INT_OPTS = {"to": 65535, "keep-alive-count": 2**32 - 1, "keep-alive-idle": 2**32 - 1,
             "keep-alive-interval": 2**32 - 1}


def _parse_inet(text: str) -> InetSocketAddress:
    """QEMU's inet_parse: HOST:PORT or [V6]:PORT, then ,options."""
    addr, *opts = text.split(",")
    try:
        host, port = partition_host_port(addr, text)
    except ValueError as e:
        raise TransportError(str(e)) from None
    if not port:
        raise TransportError(f"error parsing address '{text}'")
    kw: dict[str, Any] = {}  # a bool or an int, by option
    for opt in opts:
        key, eq, value = opt.partition("=")
        if key in _BOOL_OPTS:
            if eq and value not in ("on", "off"):
                raise TransportError(f"error parsing '{key}' flag '{value}'")
            kw[key.replace("-", "_")] = not eq or value == "on"
        elif key in _INT_OPTS:
            if not value.isdigit() or int(value) > _INT_OPTS[key]:
                raise TransportError(f"error parsing {key} '{value}'")
            kw[key.replace("-", "_")] = int(value)
        else:
            raise TransportError(f"error parsing address '{text}'")
    return InetSocketAddress(host=host, port=port, **kw)


def parse_socket_uri(uri: str) -> SocketAddress:
    scheme, _, rest = uri.partition(":")
    if scheme == "tcp":
        return SocketAddress("inet", _parse_inet(rest))
    if scheme == "unix":
        if not rest:
            raise TransportError("invalid Unix socket address")
        return SocketAddress("unix", UnixSocketAddress(path=rest))
    if scheme == "vsock":
        cid, sep, port = rest.partition(":")
        if not sep or not cid.isdigit() or not port[:1].isdigit():
            raise TransportError(f"error parsing address '{rest}'")
        digits = len(port) - len(port.lstrip("0123456789"))
        if digits != len(port):
            raise TransportError(f"trailing characters in address '{rest}'")
        return SocketAddress("vsock", VsockSocketAddress(cid=cid, port=port))
    if scheme == "fd":
        if not rest:
            raise TransportError("invalid file descriptor address")
        return SocketAddress("fd", String(str=rest))
    raise TransportError(f"unknown migration protocol: {uri}")


def _describe(sa: SocketAddress) -> str:
    v = sa.value
    if sa.tag is SocketAddressType.INET:
        return f"{v.host}:{v.port}"
    if sa.tag is SocketAddressType.UNIX:
        return v.path
    if sa.tag is SocketAddressType.VSOCK:
        return f"{v.cid}:{v.port}"
    return v.str


def _out_of_range(sa: SocketAddress) -> str | None:
    """Why a number of ``sa`` would reach the C calls cut to their width without a word (getaddrinfo takes
    port 70000 as 4464, a vsock address keeps the low 32 bits): another port or peer than the one named.
    None if none would. A tcp port may also be a service name ("http"), which getaddrinfo looks up."""
    v = sa.value
    if sa.tag is SocketAddressType.INET:
        fields, top, names = [("port", v.port)], 0xFFFF, True
    elif sa.tag is SocketAddressType.VSOCK:
        fields, top, names = [("CID", v.cid), ("port", v.port)], 0xFFFFFFFF, False
    else:
        return None
    for what, value in fields:
        if int(value) > top if value.isdigit() else not names:
            return f"error parsing address '{_describe(sa)}': {what} {value!r} is not a number from 0 to {top}"
    return None


def _inet_family(v: InetSocketAddress) -> int:
    if v.ipv4 is True and v.ipv6 is not True:
        return socket.AF_INET
    if v.ipv6 is True and v.ipv4 is not True:
        return socket.AF_INET6
    return socket.AF_UNSPEC


def _resolve(v: InetSocketAddress, passive: bool) -> list[tuple]:
    flags = socket.AI_PASSIVE if passive else 0
    if v.numeric is True:
        flags |= socket.AI_NUMERICHOST
    # an ASCII name goes as bytes: a str would be IDNA-encoded, whose first use imports codecs (~1 ms)
    host: str | bytes | None = v.host.encode("ascii") if v.host and v.host.isascii() else (v.host or None)
    try:
        return socket.getaddrinfo(host, v.port, _inet_family(v), socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as e:
        raise TransportError(f"address resolution failed for {v.host}:{v.port}: {e.strerror}") from None


#: Congestion controls that do not pace, in order of preference (reno is allowed to every user).
UNPACED_CONGESTION_CONTROLS = (b"cubic", b"reno")


def unpace_loopback(sock: socket.socket) -> str | None:
    """On a loopback TCP connection, replace any congestion control but cubic and reno (BBR paces
    every send with timers) with one of those two.

    Returns the algorithm now in use if it was changed, else None (not loopback, already cubic or
    reno, or neither available to this process).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        host = sock.getpeername()[0]
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        current = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0]
    except (OSError, ValueError):
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)) or current in UNPACED_CONGESTION_CONTROLS:
        return None
    for name in UNPACED_CONGESTION_CONTROLS:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name)
        except OSError:
            continue
        log.debug("loopback_congestion_control", was=current.decode(), now=name.decode())
        return name.decode()
    return None


#: InetSocketAddress's keep-alive members: the socket option each sets, and its QMP name.
_KEEPALIVE_OPTIONS = {
    "keep_alive": (socket.SOL_SOCKET, socket.SO_KEEPALIVE, "keep-alive"),
    "keep_alive_count": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, "keep-alive-count"),
    "keep_alive_idle": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, "keep-alive-idle"),
    "keep_alive_interval": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, "keep-alive-interval"),
}
#: the largest value a socket option takes (the schema's keep-alive members are uint32)
_C_INT_MAX = (1 << 31) - 1
#: mig's keep-alive where the address gives none: a vanished peer is noticed within about 25 s.
_KEEPALIVE_DEFAULTS = {"keep_alive": True, "keep_alive_count": 3, "keep_alive_idle": 10, "keep_alive_interval": 5}


def _proto(v: InetSocketAddress) -> int:
    return socket.IPPROTO_MPTCP if v.mptcp is True else 0


def _socket(family: int, proto: int, what: str) -> socket.socket:
    try:
        return socket.socket(family, socket.SOCK_STREAM, proto)
    except OSError as e:
        if proto == socket.IPPROTO_MPTCP:
            raise TransportError(f"Failed to create an MPTCP socket for '{what}': {e.strerror} (is "
                                 "net.mptcp.enabled set?)") from None
        raise TransportError(f"Failed to create socket for '{what}': {e.strerror}") from None


class _SocketListener(Listener):
    def __init__(self, socks: list[socket.socket], addresses: list[SocketAddress], unlink: str | None,
                 tune: Callable[[socket.socket], None] | None = None) -> None:
        self._socks = socks
        self._addresses = addresses
        self._unlink = unlink
        self._tune = tune
        self._closed = False

    @property
    def socket_addresses(self) -> list[SocketAddress]:
        return list(self._addresses)

    def accept(self) -> Channel:
        while True:
            if self._closed:
                raise ChannelAborted("the incoming listener was closed")
            poller = select.poll()  # not select(): descriptors may be numbered above 1024
            by_fd = {}
            try:
                for s in self._socks:
                    poller.register(s, select.POLLIN)
                    by_fd[s.fileno()] = s
                events = poller.poll(100)
            except (OSError, ValueError):
                raise ChannelAborted("the incoming listener was closed") from None
            for fd, _ev in events:
                s = by_fd[fd]
                try:
                    conn, _peer = s.accept()
                except OSError as e:
                    if self._closed:
                        raise ChannelAborted("the incoming listener was closed") from None
                    log.warning("accept_failed", error=str(e))
                    continue
                if self._tune is not None:
                    try:
                        self._tune(conn)
                    except TransportError as e:
                        conn.close()
                        log.warning("accepted_connection_refused", error=e.desc)
                        continue
                return SocketChannel(conn)

    def close(self) -> None:
        self._closed = True
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        if self._unlink:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass


class SocketTransport(Transport):
    """``socket``: tcp, unix, fd and vsock."""

    address_type = MigrationAddressType.SOCKET.value
    uri_schemes = ("tcp", "unix", "fd", "vsock")
    abilities = ChannelAbilities(multiple_channels=True, return_path=True, zero_copy=True)

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        return MigrationAddress("socket", parse_socket_uri(uri))

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        sa: SocketAddress = addr.value
        if sa.tag is SocketAddressType.FD and not incoming and sa.value.str not in self.ctx.named_fds:
            raise TransportError(f"File descriptor named '{sa.value.str}' has not been found")
        wide = _out_of_range(sa)
        if wide is not None:
            raise TransportError(wide)
        if sa.tag is SocketAddressType.INET:
            # options the kernel refuses (an MPTCP socket where MPTCP is off, a keep-alive count over
            # 127) are refused now, to the caller, on a scratch socket: not later in a migration thread
            v = sa.value
            scratch = _socket(socket.AF_INET, _proto(v), f"{v.host}:{v.port}")
            try:
                self._tune(scratch, v)
            finally:
                scratch.close()

    # -- outgoing ------------------------------------------------------------------

    def _tune(self, sock: socket.socket, v: InetSocketAddress | None) -> None:
        """TCP options: the address's keep-alive options where given (QEMU's inet_set_sockopts),
        mig's defaults where not (keep-alive on: 10 s idle, probes every 5 s, 3 of them)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ctx.unpaced_loopback:
            unpace_loopback(sock)
        given = {k: getattr(v, k) for k in _KEEPALIVE_OPTIONS} if v is not None else {}
        given = {k: value for k, value in given.items() if value is not UNSET}
        values = given or (_KEEPALIVE_DEFAULTS if self.ctx.keepalive else {})
        for member, value in values.items():
            level, opt, name = _KEEPALIVE_OPTIONS[member]
            if value == 0 and opt != socket.SO_KEEPALIVE:
                continue  # QEMU: a count, idle or interval of 0 leaves the system's value
            if int(value) > _C_INT_MAX:  # the kernel takes a C int: wrapped negative, which it refuses
                raise TransportError(f"Unable to set {name} option on socket: {os.strerror(errno.EINVAL)}")
            try:
                sock.setsockopt(level, opt, int(value))
            except OSError as e:
                raise TransportError(f"Unable to set {name} option on socket: {e.strerror}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.ctx.user_timeout * 1000))
        except OSError as e:  # MPTCP sockets have no user timeout; keep-alive still detects a dead peer
            log.debug("tcp_user_timeout_unavailable", error=e.strerror)

    def _connect_one(self, family: int, sockaddr: object, what: str, abort_check: Callable[[], bool],
                     proto: int = 0) -> socket.socket:
        sock = _socket(family, proto, what)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(sockaddr)  # type: ignore[arg-type]
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
                if abort_check():
                    raise ChannelAborted("connect cancelled")
                if poller.poll(100):
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    break
            if err:
                raise TransportError(f"Failed to connect to '{what}': {os.strerror(err)}")
        except BaseException:
            sock.close()
            raise
        sock.setblocking(True)
        return sock

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        sa: SocketAddress = addr.value
        v = sa.value
        what = _describe(sa)
        if sa.tag is SocketAddressType.INET:
            last: TransportError | None = None
            for family, _, _, _, sockaddr in _resolve(v, passive=False):
                try:
                    sock = self._connect_one(family, sockaddr, what, abort_check, _proto(v))
                    break
                except TransportError as e:
                    last = e
            else:
                raise last or TransportError(f"Failed to connect to '{what}'")
        elif sa.tag is SocketAddressType.UNIX:
            path = ("\0" + v.path) if v.abstract is True else v.path
            sock = self._connect_one(socket.AF_UNIX, path, what, abort_check)
        elif sa.tag is SocketAddressType.VSOCK:
            try:
                sock = self._connect_one(socket.AF_VSOCK, (int(v.cid), int(v.port)), what, abort_check)
            except OSError as e:  # the address family itself may be missing
                raise TransportError(f"Failed to connect to '{what}': {e.strerror}") from None
        else:
            sock = self._named_fd_socket(v.str, incoming=False)
        try:
            self._tune(sock, v if sa.tag is SocketAddressType.INET else None)
        except BaseException:
            sock.close()
            raise
        return SocketChannel(sock)

    def _bind_inet(self, family: int, sockaddr: tuple, v: InetSocketAddress) -> tuple[socket.socket, int]:
        """A listening socket on the address's port, or with ``to`` the first free port up to ``to``."""
        first = sockaddr[1]
        last = v.to if v.to is not UNSET and first else first
        if last < first:
            raise TransportError(f"port range 'to' {last} is below the port {first}")
        error: OSError | None = None
        for port in range(first, last + 1):
            s = _socket(family, _proto(v), f"{v.host}:{port}")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((sockaddr[0], port, *sockaddr[2:]))
                s.listen(8)
            except OSError as e:
                s.close()
                error = e
                if e.errno != errno.EADDRINUSE:
                    break
                continue
            return s, s.getsockname()[1]
        assert error is not None
        if last != first:
            raise TransportError(f"Failed to find an available port: {error.strerror}")
        raise TransportError(f"Failed to bind socket: {error.strerror}")

    def _named_fd_socket(self, name: str, incoming: bool) -> socket.socket:
        fd = self.ctx.take_fd(name) if self.ctx.take_fd else self.ctx.named_fds.pop(name, None)
        if fd is None:
            if not incoming or not name[:1].isdigit():
                raise TransportError(f"File descriptor named '{name}' has not been found")
            if not name.isdigit():
                raise TransportError(f"Invalid file descriptor number '{name}'")
            fd = os.dup(int(name))
        try:
            return socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise TransportError(f"file descriptor '{name}' is not a socket") from None

    # -- incoming ------------------------------------------------------------------------

    def listen(self, addr: MigrationAddress) -> Listener:
        sa: SocketAddress = addr.value
        v = sa.value
        if sa.tag is SocketAddressType.INET:
            socks, bound = [], []
            try:
                for family, _, _, _, sockaddr in _resolve(v, passive=True):
                    s, port = self._bind_inet(family, sockaddr, v)
                    socks.append(s)
                    fam = {"ipv4": True} if family == socket.AF_INET else {"ipv6": True}
                    bound.append(SocketAddress("inet", InetSocketAddress(host=s.getsockname()[0], port=str(port),
                                                                        **fam)))
                    if v.port == "0":
                        break  # one family, one port: what QEMU reports for port 0
            except BaseException:
                for o in socks:
                    o.close()
                raise
            return _SocketListener(socks, bound, None, lambda conn: self._tune(conn, v))
        if sa.tag is SocketAddressType.UNIX:
            path = ("\0" + v.path) if v.abstract is True else v.path
            if v.abstract is not True and os.path.exists(v.path):
                os.unlink(v.path)  # QEMU replaces a stale socket file
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                s.listen(8)
            except OSError as e:
                s.close()
                raise TransportError(f"Failed to bind socket to {v.path}: {e.strerror}") from None
            return _SocketListener([s], [SocketAddress("unix", UnixSocketAddress(path=v.path))],
                                   None if v.abstract is True else v.path)
        if sa.tag is SocketAddressType.VSOCK:
            try:
                s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                s.bind((int(v.cid), int(v.port)))
                s.listen(8)
            except OSError as e:
                raise TransportError(f"Failed to bind socket: {e.strerror}") from None
            return _SocketListener([s], [sa], None)
        sock = self._named_fd_socket(v.str, incoming=True)
        return SingleChannelListener(SocketChannel(sock), "descriptor")

