"""rdma over ZeroMQ: URI parsing, live migrations (single channel and multifd), failures, rdma-pin-all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import pytest
from mig_transport_zmq import ZmqTransport, parse_rdma_uri

from mig_core.errors import ChannelEOF
from mig_core.ext.transport import TransportContext, TransportError
from mig_core.schema.migration import MigrationAddressType
from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status
from mig_core.testing.contracts import TransportContract

RAM = 16 << 20
WL = ("--ram", "16M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "4M")


def test_uri_parsing():
    a = ZmqTransport.parse_uri("rdma:127.0.0.1:4444")
    assert a.tag is MigrationAddressType.RDMA and a.value.host == "127.0.0.1" and a.value.port == "4444"
    assert parse_rdma_uri("rdma:[::1]:5000").host == "::1"
    for bad, err in [("rdma:nohostport", "error parsing address 'nohostport'"),
                     ("rdma:[::1:5", "error parsing IPv6 address '[::1:5'"),
                     ("rdma:host:port", "error parsing address 'host:port'"),
                     ("rdma:host:99999", "error parsing address 'host:99999'")]:
        with pytest.raises(TransportError) as e:
            parse_rdma_uri(bad)
        assert e.value.desc == err


async def pair(start_host, *caps: str, dst_params: dict | None = None):
    s, d = start_host(*WL, name="src"), start_host(*WL, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    on = {"capabilities": [{"capability": c, "state": True} for c in caps]}
    for c in (src, dst):
        if caps:
            await c.execute("migrate-set-capabilities", on)
    if dst_params:
        for c in (src, dst):
            await c.execute("migrate-set-parameters", dst_params)
    return s, d, src, dst


async def listen(dst, channels: bool = False) -> str:
    if channels:
        await dst.execute("migrate-incoming", {"channels": [{"channel-type": "main", "addr": {
            "transport": "rdma", "host": "127.0.0.1", "port": "0"}}], "exit-on-error": False})
    else:
        await dst.execute("migrate-incoming", {"uri": "rdma:127.0.0.1:0", "exit-on-error": False})
    (sa,) = (await dst.execute("query-migrate"))["socket-address"]
    assert sa["type"] == "inet" and int(sa["port"]) > 0
    return sa["port"]


@pytest.mark.parametrize("form", ["uri", "channels"])
@pytest.mark.parametrize("return_path", [True, False])
async def test_live_migration(start_host, tmp_path, form, return_path):
    s, d, src, dst = await pair(start_host, *(["return-path"] if return_path else []))
    try:
        port = await listen(dst, channels=form == "channels")
        if form == "uri":
            await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
        else:
            await src.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
                "transport": "rdma", "host": "127.0.0.1", "port": port}}]})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("channels", [2, 4])
async def test_multifd_over_zmq(start_host, tmp_path, channels):
    """mig's extension: QEMU refuses multifd with rdma; here every channel is one more DEALER."""
    s, d, src, dst = await pair(start_host, "multifd", "return-path", dst_params={"multifd-channels": channels})
    try:
        port = await listen(dst)
        await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert info["ram"]["multifd-bytes"] > info["ram"]["normal-bytes"] > 0
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_refused_connection_and_capability_rules(start_host, tmp_path):
    s = start_host(*WL, name="src")
    src = await connect(s.sock)
    await src.execute("migrate", {"uri": "rdma:127.0.0.1:1"})
    info = await wait_for_status(src, {"failed"}, timeout=15)
    assert info["error-desc"] == "Failed to connect to '127.0.0.1:1': Connection refused"
    d = start_host(*WL, "--incoming", "defer", name="dst")
    dst = await connect(d.sock)
    await listen(dst)
    # a destination listening on rdma refuses what QEMU refuses there
    for cap, text in [("xbzrle", "RDMA and XBZRLE can't be used together"),
                      ("postcopy-ram", "RDMA and postcopy-ram can't be used together")]:
        assert await qmp_error(dst.execute("migrate-set-capabilities",
                                           {"capabilities": [{"capability": cap, "state": True}]})) == text
    await src.disconnect()
    await dst.disconnect()


async def test_destination_killed_mid_migration(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, "return-path")
    try:
        await src.execute("migrate-set-parameters", {"max-bandwidth": 2 << 20})
        port = await listen(dst)
        await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
        await wait_for_status(src, {"active"})
        await asyncio.sleep(0.5)
        os.kill(d.proc.pid, signal.SIGKILL)
        info = await wait_for_status(src, {"failed", "completed"}, timeout=20)
        assert info["status"] == "failed", info
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await src.disconnect()
        with contextlib.suppress(EOFError):  # its host was killed under it
            await dst.disconnect()


async def test_rdma_pin_all_locks_ram_while_migrating(start_host, tmp_path):
    s, d, src, dst = await pair(start_host, "rdma-pin-all", "return-path")
    try:
        await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
        port = await listen(dst)
        await src.execute("migrate", {"uri": f"rdma:127.0.0.1:{port}"})
        await wait_for_status(src, {"active"})

        def locked_kb() -> int:
            status = open(f"/proc/{s.proc.pid}/status").read()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmLck:")))

        assert locked_kb() >= RAM // 1024  # every RAM block pinned up front
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
        assert locked_kb() < RAM // 1024  # released when the migration ends
    finally:
        await src.disconnect()
        await dst.disconnect()


def test_replies_survive_a_slow_source_pump(tmp_path):
    """ZeroMQ drops what a connection delivered but the socket's owner had not read once the peer
    disconnects: the destination's last replies must not be lost when it closes while the source's pump is
    busy (the cause of a rare 'return path: truncated stream'). The source's pump is held before its next
    poll for longer than the destination takes to close: without the end-of-stream handshake the poll
    then sees the disconnect first and ZeroMQ discards the replies."""
    transport = ZmqTransport(TransportContext())
    listener = transport.listen(ZmqTransport.parse_uri("rdma:127.0.0.1:0"))
    (sa,) = listener.socket_addresses
    src = transport.connect(ZmqTransport.parse_uri(f"rdma:127.0.0.1:{sa.value.port}"), lambda: False)
    held, released = threading.Event(), threading.Event()
    pump = src._pump
    done = pump._done

    def held_done() -> bool:
        held.set()
        released.wait(30)
        return done()

    try:
        src.send(b"ping")
        dst = listener.accept()
        listener.close()
        assert dst.recv_exact(4) == b"ping"
        replies = [os.urandom(1000) for _ in range(50)]
        pump._done = held_done
        assert held.wait(30)
        for r in replies:
            dst.send(r)
        dst.close()
        listener.pump.join(0.5)  # a close without the handshake has disconnected well within this time
        time.sleep(0.5)  # and for the source's I/O thread to see the disconnect
        pump._done = done
        released.set()
        assert src.recv_exact(len(replies) * 1000) == b"".join(replies)
        with pytest.raises(ChannelEOF):
            src.recv_exact(1)
    finally:
        released.set()
        src.close()
        listener.close()


class TestContract(TransportContract):
    """mig's transport contract (mig_core.testing.contracts) over ZeroMQ on loopback."""

    name = "rdma"
    distribution = "mig-transport-zmq"

    def destination_address(self, tmp_path):
        return ZmqTransport.parse_uri("rdma:127.0.0.1:0")

    def connect_address(self, tmp_path, listener):
        (sa,) = listener.socket_addresses
        return ZmqTransport.parse_uri(f"rdma:127.0.0.1:{sa.value.port}")
