"""Failure semantics: cancel in every phase, dying destinations, bad streams, bad arguments."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import signal
import socket
import time

import msgpack
import numpy as np
import pytest

from mig_core.ext.channel import SocketChannel
from mig_core.machine.device import DeviceSection
from mig_core.memory.ram import allocate
from mig_core.stream import mapped_ram
from mig_core.stream.format import Command
from mig_core.stream.writer import StreamWriter
from mig_core.testing import RawQMP, connect, qmp_error, ram_digest, wait_for_status

RAM = 32 << 20
WORKLOAD = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "4M")


async def source_and_dest(start_host, dst_extra=()):
    s = start_host(*WORKLOAD, name="src")
    d = start_host(*WORKLOAD, "--incoming", "defer", *dst_extra, name="dst")
    return s, d, await connect(s.sock, "src"), await connect(d.sock, "dst")


async def assert_source_healthy_and_migrates_again(start_host, src, tmp_path):
    """The source runs (its vCPU counters advance) and a fresh migration completes."""
    assert (await src.execute("query-status"))["status"] == "running"
    d2 = start_host(*WORKLOAD, "--incoming", "defer", name="dst2")
    dst2 = await connect(d2.sock, "dst2")
    try:
        await dst2.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/again.sock"})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/again.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        assert (await wait_for_status(dst2, {"completed", "failed"}))["status"] == "completed"
    finally:
        await dst2.disconnect()


async def test_destination_killed_mid_migration(start_host, tmp_path):
    s, d, src, dst = await source_and_dest(start_host)
    await src.execute("stop")  # the workload holds still, so the source's RAM must come out unchanged
    before = await ram_digest(src, RAM, tmp_path / "before")
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    await wait_for_status(src, {"active"})
    await asyncio.sleep(0.3)
    d.proc.send_signal(signal.SIGKILL)
    info = await wait_for_status(src, {"failed"}, timeout=20)
    assert info["error-desc"], info
    assert (await src.execute("query-status"))["status"] == "paused"  # as it was before the migration
    assert await ram_digest(src, RAM, tmp_path / "after") == before
    await src.execute("cont")
    await assert_source_healthy_and_migrates_again(start_host, src, tmp_path)
    await src.disconnect()


async def test_cancel_in_setup_active_and_pre_switchover(start_host, tmp_path):
    s = start_host(*WORKLOAD, name="src")
    src = await connect(s.sock, "src")
    # setup: a listener whose backlog is full never completes the TCP handshake
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    port = blocker.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(("127.0.0.1", port))
        fillers.append(f)
    await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    await asyncio.sleep(0.3)
    assert (await src.execute("query-migrate"))["status"] == "setup"
    t = time.monotonic()
    await src.execute("migrate_cancel")
    assert time.monotonic() - t < 1.0
    assert (await wait_for_status(src, {"cancelled"}, timeout=1.0))["status"] == "cancelled"
    for f in fillers:
        f.close()
    blocker.close()

    for phase in ("active", "pre-switchover"):
        d = start_host(*WORKLOAD, "--incoming", "defer", name=f"dst-{phase}")
        dst = await connect(d.sock, "dst")
        caps = [{"capability": "pause-before-switchover", "state": phase == "pre-switchover"}]
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute("migrate-set-parameters",
                          {"max-bandwidth": (1 << 20) if phase == "active" else 0})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/{phase}.sock", "exit-on-error": False})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/{phase}.sock"})
        await wait_for_status(src, {phase})
        t = time.monotonic()
        await src.execute("migrate_cancel")
        assert time.monotonic() - t < 1.0
        assert (await wait_for_status(src, {"cancelled"}, timeout=1.0))["status"] == "cancelled"
        assert (await src.execute("query-status"))["status"] == "running"
        info = await wait_for_status(dst, {"failed"}, timeout=10)  # the destination fails cleanly
        assert "load of migration failed" in info["error-desc"]
        await dst.disconnect()
    await src.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "pause-before-switchover", "state": False}]})
    await assert_source_healthy_and_migrates_again(start_host, src, tmp_path)
    await src.disconnect()


def destination(start_host, *extra):
    return start_host("--ram", "32M", "--incoming", "defer", *extra, name="dst")


async def feed(start_host, tmp_path, payload: bytes, exit_on_error: bool):
    """Send raw bytes to a destination's incoming port; return (host, final query-migrate or None)."""
    d = destination(start_host)
    dst = await connect(d.sock, "dst")
    path = tmp_path / "in.sock"
    await dst.execute("migrate-incoming", {"uri": f"unix:{path}", "exit-on-error": exit_on_error})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(payload)
    if exit_on_error:
        with contextlib.suppress(Exception):
            await dst.disconnect()
        return d, None
    info = await wait_for_status(dst, {"failed"}, timeout=10)
    await dst.disconnect()
    return d, info


class BytesSink:
    """A ByteSink that keeps what a StreamWriter writes (crafted streams for the destination)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendv(self, buffers) -> None:
        for b in buffers:
            self.data += memoryview(b).cast("B")

    def send(self, data) -> None:
        self.sendv([data])


def stream(blocks, write) -> bytes:
    """The bytes ``write(writer)`` produces after the header of a stream for ``blocks``."""
    sink = BytesSink()
    w = StreamWriter(sink, blocks)
    w.write_header("00000000-0000-0000-0000-000000000000")
    write(w)
    return bytes(sink.data)


def valid_prefix(npages: int) -> bytes:
    """The start of a real stream for a 32 MiB pc.ram machine: header, block list, some pages."""
    blk = allocate("pc.ram", 32 << 20)
    blk.pages[:npages] = 7
    return stream([blk], lambda w: w.write_pages(blk, np.arange(npages)))


@pytest.mark.parametrize("payload,error", [
    (b"GARBAGE!" * 8, "load of migration failed: not a mig migration stream (bad magic b'GARBAGE!')"),
    (valid_prefix(16)[:-5000], "load of migration failed: truncated stream: it ended inside a page batch's data"),
    (valid_prefix(4) + b"\x99" * 64, "load of migration failed: unknown section type 0x99 at stream byte"),
])
async def test_bad_streams_fail_the_destination_cleanly(start_host, tmp_path, payload, error):
    d, info = await feed(start_host, tmp_path, payload, exit_on_error=False)
    assert info["status"] == "failed" and info["error-desc"].startswith(error), info
    assert d.proc.poll() is None  # exit-on-error false: the host stays up


async def test_fuzzed_streams(start_host, tmp_path):
    rng = np.random.default_rng(7)
    prefix = valid_prefix(2)
    for i in range(4):
        junk = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
        sub = tmp_path / str(i)
        sub.mkdir()
        d, info = await feed(start_host, sub, prefix[: len(prefix) // (i + 2)] + junk, exit_on_error=False)
        assert info["status"] == "failed" and info["error-desc"].startswith("load of migration failed: ")


async def test_bad_stream_exits_the_destination_by_default(start_host, tmp_path):
    d, _ = await feed(start_host, tmp_path, b"\x00" * 40, exit_on_error=True)
    assert d.proc.wait(10) == 1
    assert "load of migration failed" in d.logs()


async def test_mismatched_blocks_and_uuid(start_host, tmp_path):
    s = start_host(*WORKLOAD, "--uuid", "11111111-2222-3333-4444-555555555555", name="src")
    src = await connect(s.sock, "src")
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "return-path", "state": True}, {"capability": "validate-uuid", "state": True}]})
    cases = [
        (("--ram", "16M"), "load of migration failed: RAM block 'pc.ram' is 33554432 bytes on the source but "
                           "16777216 here"),
        (("--ram", "32M", "--ram", "extra=4M"), "load of migration failed: this host has RAM block 'extra', "
                                                 "which the source does not send"),
        (("--ram", "32M", "--uuid", "99999999-2222-3333-4444-555555555555"),
         "load of migration failed: UUID received is 11111111-2222-3333-4444-555555555555 and local is "
         "99999999-2222-3333-4444-555555555555"),
        (("--ram", "32M", "--vcpus", "3"), "load of migration failed: mig-run-counter: the source ran with"),
    ]
    for i, (args, error) in enumerate(cases):
        d = start_host(*args, "--incoming", "defer", name=f"dst{i}")
        dst = await connect(d.sock, "dst")
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/{i}.sock", "exit-on-error": False})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/{i}.sock"})
        info = await wait_for_status(dst, {"failed"})
        assert info["error-desc"].startswith(error), info
        src_info = await wait_for_status(src, {"failed"})
        assert src_info["error-desc"]  # the return path told the source
        assert (await src.execute("query-status"))["status"] == "running"
        await dst.disconnect()
    await src.disconnect()


async def test_fd_migration_with_getfd(start_host, tmp_path):
    s, d, src, dst = await source_and_dest(start_host)
    a, b = socket.socketpair()
    for host, fd in ((s, a), (d, b)):
        raw = RawQMP(host.sock)
        raw.negotiate()
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": "mig"}}).encode() + b"\n"
        raw.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd.fileno()]))])
        assert raw.recv_reply() == {"return": {}}
        raw.close()
    a.close()
    b.close()
    await dst.execute("migrate-incoming", {"uri": "fd:mig"})
    await src.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "fd", "str": "mig"}}]})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert "fd:mig" not in str(await src.execute("query-migrate"))
    assert await qmp_error(src.execute("closefd", {"fdname": "mig"})) == "File descriptor named 'mig' not found"
    await src.disconnect()
    await dst.disconnect()


async def test_missing_transport_plugin_is_named(start_host):
    """A host without the rdma transport plugin (hidden with MIG_DISABLED_PLUGINS) says so."""
    src = await connect(start_host("--ram", "4M", env={"MIG_DISABLED_PLUGINS": "mig-transport-zmq"}).sock)
    rdma = {"transport": "rdma", "host": "127.0.0.1", "port": "1"}
    err = await qmp_error(src.execute("migrate", {"channels": [{"channel-type": "main", "addr": rdma}]}))
    assert err.startswith("migration transport 'rdma' is not available"), err
    assert await qmp_error(src.execute("migrate", {"uri": "rdma:127.0.0.1:1"})) == (
        "unknown migration protocol: rdma:127.0.0.1:1")
    await src.disconnect()


async def test_argument_and_state_errors(start_host, tmp_path):
    s, d, src, dst = await source_and_dest(start_host)
    cases = [
        ({"uri": "foo:bar"}, "unknown migration protocol: foo:bar"),
        ({}, "need either 'uri' or 'channels' argument"),
        ({"uri": "tcp:1:2", "channels": []}, "need either 'uri' or 'channels' argument"),
        ({"uri": "tcp:localhost"}, "error parsing address 'localhost'"),
        ({"uri": "tcp:[::1"}, "error parsing IPv6 address '[::1'"),
        ({"uri": "unix:"}, "invalid Unix socket address"),
        ({"uri": "vsock:3"}, "error parsing address '3'"),
        ({"uri": "vsock:3:1024x"}, "trailing characters in address '3:1024x'"),
        # numbers wider than the C calls take are refused, not cut to another port or peer
        ({"uri": "tcp:127.0.0.1:70000"}, "error parsing address '127.0.0.1:70000': port '70000' is not a number "
                                         "from 0 to 65535"),
        ({"uri": "vsock:3:4294967296"}, "error parsing address '3:4294967296': port '4294967296' is not a number "
                                        "from 0 to 4294967295"),
        ({"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "vsock", "cid": "x",
                                                         "port": "1"}}]},
         "error parsing address 'x:1': CID 'x' is not a number from 0 to 4294967295"),
        ({"uri": "fd:"}, "invalid file descriptor address"),
        ({"uri": "fd:nope"}, "File descriptor named 'nope' has not been found"),
        ({"uri": "tcp:127.0.0.1:1", "resume": True}, "Cannot resume if there is no paused migration"),
    ]
    for args, text in cases:
        err = await qmp_error(src.execute("migrate", args))
        assert err.startswith(text), (args, err)
    assert (await src.execute("query-migrate")) == {}  # nothing started
    # an async connect failure: migrate succeeds, the migration fails with the reason
    await src.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
    info = await wait_for_status(src, {"failed"})
    assert info["error-desc"] == "Failed to connect to '127.0.0.1:1': Connection refused"
    await src.execute("migrate", {"uri": "vsock:1:1234"})
    info = await wait_for_status(src, {"failed"})
    assert info["error-desc"].startswith("Failed to connect to '1:1234': ")
    # destination-side rules
    assert await qmp_error(dst.execute("migrate", {"uri": "tcp:127.0.0.1:1"})) == (
        "Guest is waiting for an incoming migration")
    assert await qmp_error(src.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})) == (
        "'-incoming' was not specified on the command line")
    assert await qmp_error(dst.execute("migrate-incoming", {"channels": []})) == (
        "Channel list must have only one entry, for type 'main'")
    assert await qmp_error(dst.execute("migrate-incoming", {"uri": "bogus"})) == "unknown migration protocol: bogus"
    assert await qmp_error(dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:70000"})) == (
        "error parsing address '127.0.0.1:70000': port '70000' is not a number from 0 to 65535")
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/x.sock"})
    assert await qmp_error(dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/y.sock"})) == (
        "The incoming migration has already been started")
    assert await dst.execute("cont") == {}  # remembered, as QEMU does: the machine runs once loaded
    assert (await dst.execute("query-status"))["status"] == "inmigrate"
    assert await qmp_error(dst.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "multifd", "state": True}]})) == "Multifd must be set before incoming starts"
    await src.disconnect()
    await dst.disconnect()
    assert os.path.exists(tmp_path / "x.sock")


async def test_refused_migrate_changes_nothing(start_host, tmp_path):
    """Options whose machinery does not exist yet, and bad addresses, are refused; the status is untouched."""
    s, d, src, dst = await source_and_dest(start_host)
    assert await src.execute("query-migrate") == {}
    rdma = {"transport": "rdma", "host": "127.0.0.1", "port": "1", "keep-alive": True}
    assert await qmp_error(src.execute("migrate", {"channels": [{"channel-type": "main", "addr": rdma}]})) == (
        "rdma: option 'keep-alive' is not supported by the ZeroMQ transport")
    assert await qmp_error(src.execute("migrate", {"channels": []})) == "Channel list has no main entry"
    assert await qmp_error(src.execute("migrate", {"channels": [{"channel-type": "main", "addr": {
        "transport": "exec", "args": ["/bin/echo", "a\u0000b"]}}]})) == "JSON parse error, \\u0000 is not supported"
    assert await qmp_error(src.execute("migrate", {"uri": "exec:echo a\u0000b"})) == (
        "JSON parse error, \\u0000 is not supported")
    assert await src.execute("query-migrate") == {}  # nothing started, nothing failed
    # the host still migrates
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/ok.sock"})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/ok.sock"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    await src.disconnect()
    await dst.disconnect()


def device_stream(sections: list[tuple[str, object]]) -> bytes:
    """A well-framed stream for a 32 MiB pc.ram host (one vCPU, no dirty rate): header, CONFIG, the given
    device sections (id, state), end."""

    def write(w: StreamWriter) -> None:
        w.write_command(Command.CONFIG, {"validate-uuid": False, "mapped-ram": False, "x-ignore-shared": False,
                                         "multifd": None})
        for dev_id, state in sections:
            w.write_device(DeviceSection(dev_id, 0, 1, msgpack.packb(state, use_bin_type=True)))
        w.write_end()

    return stream([allocate("pc.ram", 32 << 20)], write)


GOOD_COUNTER = {"ticks": 5, "config": {"vcpus": 1, "dirty-rate": 0}}


@pytest.mark.parametrize("sections,error", [
    ([("globalstate", {"runstate": "running"}), ("mig-run-counter", [1, 2])],
     "device 'mig-run-counter' instance 0: invalid state: Expected `object`, got `array`"),
    ([("globalstate", {"runstate": "running"}), ("mig-run-counter", {"config": {"vcpus": 1, "dirty-rate": 0}})],
     "device 'mig-run-counter' instance 0: invalid state: Object missing required field `ticks`"),
    ([("globalstate", {"runstate": "running"}), ("mig-run-counter", {**GOOD_COUNTER, "ticks": "x"})],
     "device 'mig-run-counter' instance 0: invalid state: Expected `int`, got `str` - at `$.ticks`"),
    ([("globalstate", {"runstate": "running"}), ("mig-run-counter", {**GOOD_COUNTER, "ticks": -1})],
     "device 'mig-run-counter' instance 0: invalid state: Expected `int` >= 0 - at `$.ticks`"),
    ([("globalstate", {"runstate": "bogus"}), ("mig-run-counter", GOOD_COUNTER)],
     "device 'globalstate' instance 0: invalid state: Invalid enum value 'bogus' - at `$.runstate`"),
    ([("globalstate", {"runstate": "running"}), ("mig-run-counter", GOOD_COUNTER),
      ("mig-run-counter", GOOD_COUNTER)],
     "the stream carries state for device 'mig-run-counter' instance 0 twice"),
])
async def test_device_state_of_the_wrong_shape_is_refused_precisely(start_host, tmp_path, sections, error):
    d, info = await feed(start_host, tmp_path, device_stream(sections), exit_on_error=False)
    assert info["status"] == "failed" and info["error-desc"] == f"load of migration failed: {error}", info
    assert d.proc.poll() is None
    assert "internal error" not in d.logs()


async def test_mapped_ram_from_a_stream_that_cannot_seek(start_host, tmp_path):
    """A MAPPED_RAM section read from a pipe: refused with the reason, not an OS error's name."""
    blk = allocate("pc.ram", 16 << 20)
    head = stream([blk], lambda w: None)
    _layout, section = mapped_ram.plan([blk], len(head))
    image = tmp_path / "img"
    image.write_bytes(head + bytes(section))
    d = start_host("--ram", "16M", "--incoming", "defer", name="dst")
    dst = await connect(d.sock, "dst")
    await dst.execute("migrate-incoming", {"uri": f"exec:cat {image}", "exit-on-error": False})
    info = await wait_for_status(dst, {"failed", "completed"})
    assert info["status"] == "failed"
    assert info["error-desc"] == ("load of migration failed: the stream has a MAPPED_RAM section, but the incoming "
                                  "channel cannot seek: mapped-ram needs a regular file")
    # and file: on a FIFO is refused at once (it needs a file it can seek in), not left waiting for a writer
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d2 = start_host("--ram", "16M", "--incoming", "defer", name="dst2")
    dst2 = await connect(d2.sock, "dst2")
    assert await qmp_error(dst2.execute("migrate-incoming", {"uri": f"file:{fifo}"})) == (
        f"Could not open '{fifo}': Illegal seek")
    await dst.disconnect()
    await dst2.disconnect()


def test_a_bug_on_the_destination_is_an_internal_error_not_a_bad_stream():
    """Only mig's own errors (MigError, OSError) mean "this stream cannot be loaded"; a ValueError from a
    bug is reported as an internal error, with its traceback in the log."""
    from structlog.testing import capture_logs

    from mig_core.control.manager import MigrationManager
    from mig_core.engine.incoming import IncomingMigration
    from mig_core.ext.transport import SingleChannelListener
    from mig_core.machine.device import Device
    from mig_core.machine.machine import Machine
    from mig_core.schema.common import RunState, Side
    from mig_core.schema.migration import MigrationStatus

    class Buggy(Device):
        id = "buggy"

        def load_setup(self) -> None:
            np.zeros(3).reshape(2, 2)  # ValueError: cannot reshape array of size 3 into shape (2,2)

    machine = Machine(runstate=RunState.INMIGRATE)
    machine.add_ram("pc.ram", 1 << 20)
    machine.add_device(Buggy())
    manager = MigrationManager(machine)
    a, b = socket.socketpair()
    a.sendall(stream(machine.blocks, lambda w: w.write_end()))
    a.close()
    manager.destination.cas(MigrationStatus.NONE, MigrationStatus.SETUP)
    inc = IncomingMigration(manager.engine_context(Side.DESTINATION), SingleChannelListener(SocketChannel(b), "test"),
                            exit_on_error=False)
    with capture_logs() as logs:
        inc.start()
        inc.thread.join(30)
    assert manager.destination.state is MigrationStatus.FAILED
    assert manager.error_desc == ("load of migration failed: internal error: ValueError: cannot reshape array of "
                                  "size 3 into shape (2,2)")
    assert any(e["event"] == "incoming_thread_crashed" and e.get("exc_info") for e in logs)
    machine.close()
