"""The socket transport is installed, discovered, parses QEMU's URIs, and carries a stream."""

import socket
import threading
from pathlib import Path

import pytest
from mig_transport_socket import unpace_loopback

from mig_core import PluginRegistry
from mig_core.ext.transport import TransportContext, TransportError, TransportRegistry
from mig_core.qapi import to_qmp
from mig_core.testing.contracts import TransportContract


def test_discovered_by_scheme():
    reg = TransportRegistry(PluginRegistry())
    for scheme in ("tcp", "unix", "fd", "vsock"):
        cls = reg.for_uri(f"{scheme}:x")
        assert cls.address_type == "socket"
    with pytest.raises(TransportError, match="unknown migration protocol: foo:1"):
        reg.for_uri("foo:1")


@pytest.mark.parametrize("uri,wire", [
    ("tcp:127.0.0.1:4444", {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}),
    ("tcp:[::1]:0,ipv6", {"transport": "socket", "type": "inet", "host": "::1", "port": "0", "ipv6": True}),
    ("tcp::5,to=9,keep-alive=off", {"transport": "socket", "type": "inet", "host": "", "port": "5", "to": 9,
                                    "keep-alive": False}),
    ("unix:/tmp/x", {"transport": "socket", "type": "unix", "path": "/tmp/x"}),
    ("vsock:3:1024", {"transport": "socket", "type": "vsock", "cid": "3", "port": "1024"}),
    ("fd:mig", {"transport": "socket", "type": "fd", "str": "mig"}),
])
def test_uri_parsing(uri, wire):
    cls = TransportRegistry(PluginRegistry()).for_uri(uri)
    assert to_qmp(cls.parse_uri(uri)) == wire


def test_listen_connect_and_abort(tmp_path):
    reg = TransportRegistry(PluginRegistry())
    cls, addr = reg.parse(f"unix:{tmp_path}/t.sock")
    t = cls(TransportContext())
    listener = t.listen(addr)
    ch = t.connect(addr, lambda: False)  # completes against the listen backlog
    ch.send(b"hello")
    peer = listener.accept()
    assert peer.recv_exact(5) == b"hello"
    listener.close()
    ch.close()
    peer.close()
    tcp_cls, tcp_addr = reg.parse("tcp:127.0.0.1:0")
    lst = tcp_cls(TransportContext()).listen(tcp_addr)
    (sa,) = lst.socket_addresses
    assert sa.value.port != "0" and sa.value.ipv4 is True
    errors = []

    def blocked_accept():
        try:
            lst.accept()
        except Exception as e:  # noqa: BLE001 - the abort is what we wait for
            errors.append(e)

    th = threading.Thread(target=blocked_accept)
    th.start()
    lst.close()  # a blocked accept returns promptly
    th.join(10)
    assert not th.is_alive() and errors



def _congestion(sock) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0]


CC = Path("/proc/sys/net/ipv4")


@pytest.mark.skipif(b"bbr" not in (CC / "tcp_available_congestion_control").read_bytes().split(),
                    reason="needs the bbr congestion control")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_connection_stops_pacing(host):
    """A loopback connection on BBR (which paces every send) is switched to cubic or reno; one already
    switched, and a unix socket, are left as they are."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as srv, \
            socket.create_connection(srv.getsockname()[:2]) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
        now = unpace_loopback(c)
        assert now in ("cubic", "reno") and _congestion(c) == now.encode()
        assert unpace_loopback(c) is None
    a, b = socket.socketpair()
    with a, b:
        assert unpace_loopback(a) is None


@pytest.mark.skipif((CC / "tcp_congestion_control").read_bytes().strip() != b"bbr",
                    reason="the system's default congestion control is not bbr")
def test_migration_connections_on_loopback_do_not_pace():
    """The transport's own connections: unpaced by default, the system's bbr when the host turns it off."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        reg = TransportRegistry(PluginRegistry())
        cls, addr = reg.parse(f"tcp:127.0.0.1:{srv.getsockname()[1]}")
        for ctx, expected in ((TransportContext(), {b"cubic", b"reno"}),
                              (TransportContext(unpaced_loopback=False), {b"bbr"})):
            ch = cls(ctx).connect(addr, lambda: False)
            assert _congestion(ch.sock) in expected
            ch.close()


def _inet(uri: str, tmp_path=None):
    reg = TransportRegistry(PluginRegistry())
    cls, addr = reg.parse(uri)
    return cls(TransportContext()), addr


def _connected(uri: str):
    """Listen and connect with the same address options; the accepted and the connected socket."""
    t, addr = _inet(uri)
    t.check_address(addr, incoming=True)
    listener = t.listen(addr)
    port = listener.socket_addresses[0].value.port
    out_t, out_addr = _inet(uri.replace(":0", f":{port}", 1))
    out_t.check_address(out_addr, incoming=False)
    got: list = []
    th = threading.Thread(target=lambda: got.append(listener.accept()))
    th.start()
    src = out_t.connect(out_addr, lambda: False)
    th.join(30)
    listener.close()
    return got[0], src


def _keepalive(sock: socket.socket) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL))


def test_keep_alive_options_reach_both_ends():
    dst, src = _connected("tcp:127.0.0.1:0,keep-alive=on,keep-alive-count=7,keep-alive-idle=42,"
                          "keep-alive-interval=11")
    try:
        assert _keepalive(src.sock)[0] and _keepalive(src.sock)[1:] == (7, 42, 11)
        assert _keepalive(dst.sock)[0] and _keepalive(dst.sock)[1:] == (7, 42, 11)
    finally:
        src.close()
        dst.close()
    dst, src = _connected("tcp:127.0.0.1:0,keep-alive=off")
    try:
        assert _keepalive(src.sock)[0] == 0 and _keepalive(dst.sock)[0] == 0
    finally:
        src.close()
        dst.close()
    # nothing given: mig's defaults on both ends (keep-alive on, 10 s idle, every 5 s, 3 probes)
    dst, src = _connected("tcp:127.0.0.1:0")
    try:
        assert _keepalive(src.sock) == (1, 3, 10, 5) and _keepalive(dst.sock) == (1, 3, 10, 5)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("option", ["keep-alive-count=1000", "keep-alive-count=4294967295",
                                    "keep-alive-idle=2147483648", "keep-alive-interval=3000000000"])
def test_keep_alive_values_the_kernel_refuses_are_refused_at_once(option: str):
    """What the kernel refuses, and uint32 values beyond a C int (the kernel would get them negative)."""
    t, addr = _inet(f"tcp:127.0.0.1:1,keep-alive=on,{option}")
    name = option.partition("=")[0]
    with pytest.raises(TransportError, match=f"^Unable to set {name} option on socket: Invalid argument$"):
        t.check_address(addr, incoming=False)


def test_mptcp_on_both_ends():
    enabled = Path("/proc/sys/net/mptcp/enabled")
    if not enabled.exists() or enabled.read_text().strip() != "1":
        # a kernel without MPTCP: the option is refused at once, never ignored
        t, addr = _inet("tcp:127.0.0.1:1,mptcp=on")
        with pytest.raises(TransportError, match="Failed to create an MPTCP socket for '127.0.0.1:1'"):
            t.check_address(addr, incoming=False)
        return
    dst, src = _connected("tcp:127.0.0.1:0,mptcp=on")
    try:
        assert src.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_MPTCP
        assert dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_MPTCP
    finally:
        src.close()
        dst.close()
    dst, src = _connected("tcp:127.0.0.1:0")
    try:
        assert src.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
    finally:
        src.close()
        dst.close()


def _busy_port_with_room() -> socket.socket:
    """A listening socket on a port below the ephemeral range, with 20 ports above it to try."""
    for port in range(20000, 32000, 37):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        return s
    raise AssertionError("no free port between 20000 and 32000")


def test_to_listens_on_the_first_free_port_of_the_range():
    with _busy_port_with_room() as busy:
        port = busy.getsockname()[1]
        t, addr = _inet(f"tcp:127.0.0.1:{port},to={port + 20}")
        listener = t.listen(addr)
        try:
            got = int(listener.socket_addresses[0].value.port)
            assert port < got <= port + 20
        finally:
            listener.close()
        t, addr = _inet(f"tcp:127.0.0.1:{port},to={port}")
        with pytest.raises(TransportError, match="Failed to bind socket: Address already in use"):
            t.listen(addr)
        t, addr = _inet(f"tcp:127.0.0.1:{port},to={port - 1}")
        with pytest.raises(TransportError, match=f"port range 'to' {port - 1} is below the port {port}"):
            t.listen(addr)


class TestContract(TransportContract):
    """mig's transport contract (mig_core.testing.contracts) over a Unix socket."""

    name = "socket"
    distribution = "mig-transport-socket"

    def source_address(self, tmp_path):
        return TransportRegistry(PluginRegistry()).parse(f"unix:{tmp_path}/contract.sock")[1]


class TestContractTcp(TestContract):
    """The same contract over TCP on loopback, on the port the listener was given."""

    def destination_address(self, tmp_path):
        return TransportRegistry(PluginRegistry()).parse("tcp:127.0.0.1:0")[1]

    def connect_address(self, tmp_path, listener):
        (sa,) = listener.socket_addresses
        return TransportRegistry(PluginRegistry()).parse(f"tcp:127.0.0.1:{sa.value.port}")[1]
