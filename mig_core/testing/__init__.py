"""Test helpers for mig and its plugins: a real ``mig run`` host process and QMP clients.

Plugin authors use these in their own tests: ``Host`` starts a host serving QMP
on a unix socket, ``RawQMP`` speaks QMP over a plain socket (for requests a
library client refuses to send), ``connect`` returns a negotiated ``qemu.qmp``
client, ``LoopbackTransport``/``migrate_in_process`` migrate two machines in one
process without sockets. ``mig_core.testing.contracts`` holds the contract test
classes a plugin's tests subclass (compressor, transport, dirty tracker).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient

from mig_core.control.manager import MigrationManager
from mig_core.ext.channel import Channel, ChannelAbilities
from mig_core.ext.memory_channel import loopback_pair
from mig_core.ext.transport import Listener, SingleChannelListener, Transport, TransportContext
from mig_core.schema.migration import MigrationAddress, MigrationStatus
from mig_core.schema.sockets import SocketAddress, String

__all__ = ["Host", "RawQMP", "connect", "wait_until", "wait_for_status", "ram_digest", "vcpu_records", "qmp_error",
           "pause_and_recover",
           "LoopbackTransport", "migrate_in_process", "run_job", "InProcessServer"]


class Host:
    """A ``mig run`` subprocess serving QMP on a unix socket; logs (JSON) go to ``<name>.log``.

    ``wrapper`` is a command prefix (e.g. ``unshare``/``setpriv``) to run the host in a restricted setting;
    ``python`` another interpreter (e.g. a virtual environment with extra plugins); ``cwd`` its directory;
    ``pass_fds`` descriptors it inherits (e.g. a memfd for ``--ram ...,backing=memfd,fd=N``).
    """

    def __init__(self, tmp: Path, *args: str, name: str = "host", env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None, python: str | None = None, cwd: Path | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.sock = tmp / f"{name}.sock"
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w+")
        full_env = {**os.environ, "MIG_LOG_FORMAT": "json", "MIG_LOG_LEVEL": "debug", **(env or {})}
        self.proc = subprocess.Popen(
            [*(wrapper or []), python or sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{self.sock}", *args],
            stdout=subprocess.PIPE, stderr=self.log, env=full_env, text=True, cwd=cwd, pass_fds=pass_fds,
        )
        assert self.proc.stdout is not None
        #: the addresses the monitors listen on, in order (the first is ``sock``; a tcp port 0 is resolved)
        self.monitors: list[str] = []
        for _ in range(1 + args.count("--qmp")):  # one "mig: QMP listening on ..." line per monitor
            line = self.proc.stdout.readline()
            if "listening" not in line:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"mig run did not start: {line!r}\n{self.logs()}")
            self.monitors.append(line.rsplit(" ", 1)[-1].strip())

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def log_events(self) -> list[dict[str, Any]]:
        """The host's structlog events (one JSON object per line)."""
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


async def connect(path: Path | str, name: str = "test") -> QMPClient:
    """A ``qemu.qmp`` client connected to ``path`` with capabilities negotiated."""
    client = QMPClient(name)
    await client.connect(str(path))
    return client


class RawQMP:
    """A plain socket speaking QMP line by line."""

    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""
        #: events received while waiting for replies, in order
        self.events: list[dict[str, Any]] = []
        self.greeting = self.recv()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: object) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def cmd(self, obj: object) -> dict[str, Any]:
        self.send(obj)
        return self.recv_reply()

    def cmd_raw(self, data: bytes) -> dict[str, Any]:
        """Send bytes as they are and return the next reply."""
        self.send_raw(data)
        return self.recv_reply()

    def negotiate(self) -> None:
        reply = self.cmd({"execute": "qmp_capabilities"})
        if reply != {"return": {}}:
            raise AssertionError(f"negotiation failed: {reply}")

    def close(self) -> None:
        self.sock.close()


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads has stopped. kill() only queues the signal:
    until one of the threads takes it, the others run on (a frozen destination once loaded the source's
    last data in that window, and the migration completed under a test that expected it to wait)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # the thread ended meanwhile
        return bool(states) and all(state in "TtZX" for state in states)

    wait_until(stopped, timeout, interval=0.002)


async def wait_for_status(client: QMPClient, states: set[str] | tuple[str, ...],
                          timeout: float = 30.0) -> dict[str, Any]:
    """Poll ``query-migrate`` until its status is one of ``states``; return that reply."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        info = cast(dict[str, Any], await client.execute("query-migrate"))
        if info.get("status") in states:
            return info  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"status {info.get('status')} not in {states} after {timeout} s: {info}")
        await asyncio.sleep(0.02)


async def wait_postcopy_bytes(client: QMPClient, at_least: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the source's ``query-migrate`` until it is in ``postcopy-active`` with at least ``at_least``
    postcopy bytes sent; return that reply. Any status but the way there fails at once."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        info = cast(dict[str, Any], await client.execute("query-migrate"))
        if info["status"] == "postcopy-active" and info["ram"]["postcopy-bytes"] >= at_least:
            return info
        assert info["status"] in ("active", "device", "postcopy-active"), info
        if time.monotonic() > deadline:
            raise AssertionError(f"postcopy made no progress in {timeout:g} s: {info}")
        await asyncio.sleep(0.01)


async def pause_and_recover(src: QMPClient, dst: QMPClient, pauser: QMPClient, uri: str) -> None:
    """migrate-pause a running postcopy on ``pauser`` (out of band: never queued behind other commands), wait
    until both sides are postcopy-paused, then recover at ``uri``: migrate-recover there, migrate
    resume=true from the source, and wait until the source runs postcopy again (or completed)."""
    await pauser.execute("migrate-pause", oob=True)
    await wait_for_status(src, {"postcopy-paused"})
    await wait_for_status(dst, {"postcopy-paused"})  # (its monitor front answers: a vCPU may wait on a page)
    await dst.execute("migrate-recover", {"uri": uri})
    await src.execute("migrate", {"uri": uri, "resume": True})
    await wait_for_status(src, {"postcopy-active", "completed"})


async def migrate_and_wait(client: QMPClient, arguments: dict[str, Any],
                           states: tuple[str, ...] = ("completed", "failed", "cancelled"),
                           timeout: float = 600.0) -> dict[str, Any]:
    """``migrate`` with the ``events`` capability on, then wait for the MIGRATION event reaching one of
    ``states`` and return ``query-migrate``: no polling, as management software waits (a poller on a
    small machine takes CPU from the migration it watches)."""
    import asyncio

    await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    with client.listener("MIGRATION") as events:
        await client.execute("migrate", arguments)

        async def ended() -> None:
            async for event in events:
                if cast(dict[str, Any], event["data"])["status"] in states:
                    return

        await asyncio.wait_for(ended(), timeout)
    return await client.execute("query-migrate")  # type: ignore[return-value]


async def ram_digest(client: QMPClient, size: int, path: Path) -> str:
    """sha256 of the first ``size`` bytes of guest RAM, read with ``pmemsave``."""
    import hashlib

    await client.execute("pmemsave", {"val": 0, "size": size, "filename": str(path)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def vcpu_records(client: QMPClient, vcpus: int, path: Path) -> list[tuple[int, int, int, int]]:
    """The reference host's per-vCPU records (counter, heartbeat ns, pages written, longest gap ns)."""
    from mig_core.machine.reference_host import RECORD, RECORD_STRIDE

    await client.execute("pmemsave", {"val": 0, "size": 4096, "filename": str(path)})
    data = path.read_bytes()
    return [RECORD.unpack_from(data, i * RECORD_STRIDE) for i in range(vcpus)]


async def wait_until_async(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Like ``wait_until``, yielding to the event loop between tries (events keep arriving)."""
    deadline = time.monotonic() + timeout
    while not (result := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)
    return result


async def wait_records_advance(client: QMPClient, vcpus: int, before: list[tuple[int, int, int, int]], path: Path,
                               timeout: float = 30.0) -> list[tuple[int, int, int, int]]:
    """Wait until every vCPU's counter moved past ``before`` (the workload runs); the new records."""
    deadline = time.monotonic() + timeout
    while True:
        now = await vcpu_records(client, vcpus, path)
        if all(a[0] > b[0] for a, b in zip(now, before, strict=True)):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the vCPUs did not run on within {timeout:g} s: {before} -> {now}")
        await asyncio.sleep(0.05)


class InProcessServer:
    """A ``QMPServer`` for ``manager`` on a unix socket, its event loop on a thread of its own (a test
    drives it with ``RawQMP`` or ``connect`` while this process's manager is inspected directly)."""

    def __init__(self, manager: MigrationManager, path: Path) -> None:
        from mig_core.qmp.server import QMPServer

        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test/qmp")
        self.thread.start()

        async def start() -> QMPServer:
            server = QMPServer(manager)
            await server.listen(f"unix:{path}")
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def run_job(client: QMPClient, command: str, arguments: dict[str, Any], timeout: float = 60.0,
                  dismiss: bool = True) -> dict[str, Any]:
    """Start a job command (``job-id`` in ``arguments``), wait until the job concluded, dismiss it (unless
    told not to) and return its last query-jobs entry (``error`` says why it failed)."""
    import asyncio

    job_id = arguments["job-id"]
    await client.execute(command, arguments)
    deadline = time.monotonic() + timeout
    while True:
        jobs = cast(list[dict[str, Any]], await client.execute("query-jobs"))
        info = next((j for j in jobs if j["id"] == job_id), None)
        if info is not None and info["status"] == "concluded":
            if dismiss:
                await client.execute("job-dismiss", {"id": job_id})
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not conclude within {timeout} s: {info}")
        await asyncio.sleep(0.02)


async def qmp_error(awaitable: Any) -> str:
    """The ``desc`` of the QMP error a command must fail with (AssertionError if it succeeds)."""
    from qemu.qmp import ExecuteError

    try:
        await awaitable
    except ExecuteError as e:
        return e.error.error.desc
    raise AssertionError("the command succeeded")


# -- two machines in one process ------------------------------------------------------------


class LoopbackTransport(Transport):
    """An in-memory transport for tests: one instance is both ends of one migration, no sockets.

    ``connect`` hands the source one end of a ``loopback_pair``; ``listen`` hands the destination the
    other. Its address is a placeholder (a socket ``fd`` named ``loopback``) that nothing resolves.
    """

    address_type = "loopback"
    uri_schemes = ()
    abilities = ChannelAbilities(return_path=True)

    def __init__(self, ctx: TransportContext | None = None) -> None:
        super().__init__(ctx or TransportContext())
        self._source, self._destination = loopback_pair()

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        return cls.address()

    @staticmethod
    def address() -> MigrationAddress:
        return MigrationAddress("socket", SocketAddress("fd", String(str="loopback")))

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        return self._source

    def listen(self, addr: MigrationAddress) -> Listener:
        return SingleChannelListener(self._destination, "loopback")


def migrate_in_process(source: MigrationManager, destination: MigrationManager,
                       timeout: float = 60.0) -> MigrationStatus:
    """Migrate ``source`` into ``destination`` (a manager whose machine waits in inmigrate) over a
    ``LoopbackTransport``; returns the source's final status once both sides have ended."""
    from mig_core.control.status import RUNNING_STATES

    transport = LoopbackTransport()
    destination.migrate_incoming_with(transport, transport.address(), exit_on_error=False)
    source.migrate_with(transport, transport.address())
    ended = frozenset(set(MigrationStatus) - RUNNING_STATES - {MigrationStatus.NONE})
    if not source.source.wait_for(ended, timeout):
        raise AssertionError(f"the source is still {source.source.state.value} after {timeout:g} s")
    destination.destination.wait_for({MigrationStatus.COMPLETED, MigrationStatus.FAILED}, timeout)
    return source.source.state
