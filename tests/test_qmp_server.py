"""The QMP server against the protocol: greeting, negotiation, dispatch, events, bad clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

from mig_core.testing import InProcessServer, RawQMP, connect

ISSUE_COMMANDS = {
    "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont", "quit",
    "query-migrate", "migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters",
    "query-migrate-parameters", "migrate_cancel",
}


def test_greeting_and_negotiation_shapes(raw):
    c = raw()
    g = c.greeting["QMP"]
    assert g["capabilities"] == ["oob"]
    assert g["version"]["qemu"] == {"major": 9, "minor": 1, "micro": 0}
    assert g["version"]["package"].startswith("mig ")
    # Before negotiation every other command is refused, as QEMU does.
    assert c.cmd({"execute": "query-status", "id": 1}) == {
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": 1,
    }
    assert c.cmd({"execute": "qmp_capabilities", "id": "n"}) == {"return": {}, "id": "n"}
    assert c.cmd({"execute": "qmp_capabilities"}) == {
        "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}
    }
    assert c.cmd({"execute": "query-version"})["return"] == g["version"]


def test_negotiation_argument_errors(raw):
    c = raw()
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}})["error"]["desc"] == (
        "Parameter 'null' does not accept value 'bogus'"
    )
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"x": 1}})["error"]["desc"] == (
        "Parameter 'x' is unexpected"
    )
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}


async def test_qemu_qmp_client_drives_every_issue_command(host):
    client = await connect(host.sock)
    names = {c["name"] for c in await client.execute("query-commands")}
    assert ISSUE_COMMANDS <= names
    assert "migrate_set_speed" not in names
    assert await client.execute("query-status") == {"running": True, "status": "running"}
    assert await client.execute("query-migrate") == {}
    caps = await client.execute("query-migrate-capabilities")
    assert len(caps) == 23 and not any(c["state"] for c in caps)  # QEMU's 22 and mig's x-checksums
    params = await client.execute("query-migrate-parameters")
    assert len(params) == 29  # 30 parameters (2 mig's own); block-bitmap-mapping only once set
    assert await client.execute("migrate_cancel") == {}  # nothing runs: silently succeeds
    await client.execute("stop")
    assert await client.execute("query-status") == {"running": False, "status": "paused"}
    await client.execute("cont")
    assert await client.execute("query-status") == {"running": True, "status": "running"}
    await client.execute("quit")
    with contextlib.suppress(EOFError):  # the host closes the connection as it exits, like QEMU
        await client.disconnect()
    assert host.proc.wait(10) == 0


def test_request_envelope_errors(raw):
    c = raw()
    c.negotiate()
    cases = [
        ([1, 2], "QMP input must be a JSON object"),
        ("str", "QMP input must be a JSON object"),
        ({"id": 3}, "QMP input lacks member 'execute'"),
        ({"execute": 5}, "QMP input member 'execute' must be a string"),
        ({"execute": "query-status", "arguments": [1]}, "QMP input member 'arguments' must be an object"),
        ({"execute": "query-status", "foo": 1}, "QMP input member 'foo' is unexpected"),
        ({"exec-oob": "migrate-pause"}, "QMP input member 'exec-oob' is unexpected"),  # oob not enabled
    ]
    for req, desc in cases:
        reply = c.cmd(req)
        assert reply["error"] == {"class": "GenericError", "desc": desc}, req
    assert c.cmd({"execute": "nope", "id": [1]}) == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": [1]
    }
    assert c.cmd({"execute": "query-status", "arguments": {"x": 1}})["error"]["desc"] == (
        "Parameter 'x' is unexpected"
    )
    # ids of any JSON type come back unchanged, on success too
    assert c.cmd({"execute": "query-status", "id": {"a": [None, 1.5]}})["id"] == {"a": [None, 1.5]}


def test_malformed_json_and_framing(raw):
    c = raw()
    c.negotiate()
    c.send_raw(b'{"execute": query-status}\n')
    err = c.recv_reply()["error"]
    assert err["class"] == "GenericError" and err["desc"].startswith("JSON parse error, ")
    c.send_raw(b"}\n")
    assert c.recv_reply()["error"]["desc"].startswith("JSON parse error")
    # two requests in one write, one request split over several writes
    c.send_raw(b'{"execute":"query-status","id":1}{"execute":"query-status","id":2}\n')
    assert [c.recv_reply()["id"], c.recv_reply()["id"]] == [1, 2]
    c.send_raw(b'{"execute":')
    time.sleep(0.05)
    c.send_raw(b'"query-version", "id": "split"}')
    assert c.recv_reply()["id"] == "split"
    # still serving
    assert c.cmd({"execute": "query-status"})["return"]["status"] == "running"


def _alive(c: RawQMP, n: int) -> None:
    assert c.cmd({"execute": "query-status", "id": n}) == {"return": {"running": True, "status": "running"},
                                                            "id": n}


def test_json_limits_are_answered_and_the_session_goes_on(raw):
    """QEMU's limits per value: nesting 1024, 64 MiB of tokens, 2 Mi tokens; each an error reply."""
    c = raw()
    c.negotiate()
    c.sock.settimeout(120)
    c.send_raw(b"[" * 1025 + b"]" * 1025 + b"\n")
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}
    _alive(c, 1)
    # 1024 levels are within the limit: the request is parsed and refused for what it says
    deep = b'{"execute": "query-status", "id": 2, "arguments": {"a": ' + b"[" * 1022 + b"]" * 1022 + b"}}\n"
    assert c.cmd_raw(deep) == {"error": {"class": "GenericError", "desc": "Parameter 'a' is unexpected"}, "id": 2}
    c.send_raw(b'{"execute": "query-status", "id": "' + b"x" * (64 << 20) + b'"}\n')
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
    _alive(c, 3)
    c.send_raw(b"[" + b"0," * (1 << 20) + b"0]\n")  # 2 Mi + 2 tokens
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}}
    _alive(c, 4)


def test_stray_bytes_are_answered_and_the_next_request_is_served(raw):
    c = raw()
    c.negotiate()
    c.send_raw(b'\x00\x00\x00{"execute": "query-status", "id": 1}\n')
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\\x00'"}}
    assert c.recv_reply()["id"] == 1
    c.send_raw(b'{"execute": "query-st\xff\n{"execute": "query-status", "id": 2}\n')
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\\xff'"}}
    assert c.recv_reply()["id"] == 2
    c.send_raw(b'{"execute": "query-status", "id": 3, "arguments": {"x\\u0000": 1}}\n')
    assert c.recv_reply() == {"error": {"class": "GenericError", "desc": "JSON parse error, \\u0000 is not supported"},
                              "id": 3}
    c.send_raw(b"}]\n")
    assert c.recv_reply()["error"]["desc"] == "JSON parse error, stray '}'"
    assert c.recv_reply()["error"]["desc"] == "JSON parse error, stray ']'"
    _alive(c, 4)


def test_vanishing_clients_do_not_disturb_others(host, raw):
    good = raw()
    good.negotiate()
    for _ in range(5):
        bad = RawQMP(host.sock)
        bad.negotiate()
        # ask for a reply and leave before reading it (reset on close)
        bad.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        bad.send({"execute": "query-migrate-parameters"})
        bad.close()
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(host.sock))
    half.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-sta')
    half.close()
    assert good.cmd({"execute": "query-status"})["return"]["running"] is True
    assert host.proc.poll() is None


async def test_events_reach_every_negotiated_client(host):
    a, b = await connect(host.sock, "a"), await connect(host.sock, "b")
    unnegotiated = RawQMP(host.sock)
    try:
        await a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})

        async def first_events(client: QMPClient, n: int) -> list[dict]:
            out = []
            async for ev in client.events:
                out.append(ev)
                if len(out) == n:
                    return out
            return out

        ta = asyncio.create_task(first_events(a, 2))
        tb = asyncio.create_task(first_events(b, 2))
        await asyncio.sleep(0.05)
        await b.execute("stop")
        await a.execute("cont")
        ea, eb = await asyncio.wait_for(ta, 5), await asyncio.wait_for(tb, 5)
        for evs in (ea, eb):
            assert [e["event"] for e in evs] == ["STOP", "RESUME"]
            ts = evs[0]["timestamp"]
            assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
            assert abs(ts["seconds"] - time.time()) < 60
        # a client still negotiating gets no events
        unnegotiated.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            unnegotiated.recv()
    finally:
        unnegotiated.close()
        await a.disconnect()
        await b.disconnect()


async def test_concurrent_clients(host):
    clients = [await connect(host.sock, f"c{i}") for i in range(6)]
    try:
        async def work(i: int, c: QMPClient) -> None:
            for j in range(20):
                await c.execute("migrate-set-parameters", {"downtime-limit": 1000 * i + j})
                await c.execute("query-migrate-parameters")
        await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
        final = (await clients[0].execute("query-migrate-parameters"))["downtime-limit"]
        assert final % 1000 == 19
    finally:
        for c in clients:
            await c.disconnect()


def test_oob_requires_negotiation_and_allowed_commands(raw):
    c = raw()
    assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}
    assert c.cmd({"exec-oob": "query-status", "id": 1}) == {
        "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}, "id": 1
    }
    reply = c.cmd({"exec-oob": "migrate-pause", "id": 2})
    assert reply["error"]["desc"] == (
        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
    )
    assert c.cmd({"execute": "query-status", "exec-oob": "migrate-pause"})["error"]["desc"] == (
        "QMP input must not have both 'execute' and 'exec-oob'"
    )


def test_tcp_monitor(start_host, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = start_host("--qmp", f"tcp:127.0.0.1:{port}")
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = conn.makefile("rwb")
    greeting = json.loads(f.readline())
    assert "QMP" in greeting
    f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status","id":"t"}\n')
    f.flush()
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline()) == {"return": {"running": True, "status": "running"}, "id": "t"}
    conn.close()
    assert h.proc.poll() is None


def test_getfd_and_closefd_over_unix_socket(raw, tmp_path):
    c = raw()
    c.negotiate()
    assert c.cmd({"execute": "getfd", "arguments": {"fdname": "x"}})["error"]["desc"] == (
        "No file descriptor supplied via SCM_RIGHTS"
    )
    r, w = socket.socketpair()
    msg = json.dumps({"execute": "getfd", "arguments": {"fdname": "mine"}}).encode() + b"\n"
    c.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, __import__("array").array("i", [w.fileno()]))])
    assert c.recv_reply() == {"return": {}}
    assert c.cmd({"execute": "closefd", "arguments": {"fdname": "mine"}}) == {"return": {}}
    assert c.cmd({"execute": "closefd", "arguments": {"fdname": "mine"}})["error"]["desc"] == (
        "File descriptor named 'mine' not found"
    )
    r.close()
    w.close()


async def test_execute_errors_through_qemu_qmp(qmp):
    with pytest.raises(ExecuteError) as e:
        await qmp.execute("migrate-set-parameters", {"downtime-limit": "abc"})
    assert e.value.error.error.desc == "Parameter 'downtime-limit' expects uint64"
    assert e.value.error.error.class_ == "GenericError"


def test_oob_command_overtakes_a_stuck_in_band_command(tmp_path):
    """An exec-oob command is answered while an in-band command holds the in-band lock."""
    from mig_core.control.manager import MigrationManager

    manager = MigrationManager()
    served = InProcessServer(manager, tmp_path / "oob.sock")
    server = served.server
    c = RawQMP(served.path)
    try:
        assert c.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}
        server._big_lock.acquire()  # an in-band command that takes long
        c.send({"execute": "query-status", "id": "slow"})
        c.send({"exec-oob": "migrate-pause", "id": "fast"})
        first = c.recv_reply()
        assert first["id"] == "fast"
        server._big_lock.release()
        assert c.recv_reply() == {"return": {"running": True, "status": "running"}, "id": "slow"}
    finally:
        c.close()
        served.close()


def test_out_of_band_commands_never_wait_behind_in_band_ones(host, raw, tmp_path):
    """An in-band pmemsave blocks on a FIFO nobody reads; eight clients queue in-band commands behind it;
    exec-oob is answered all the same."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    blocker = raw()
    blocker.negotiate()
    blocker.send({"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": str(fifo)}, "id": "b"})
    waiting = []
    for i in range(8):
        c = raw()
        c.negotiate()
        c.send({"execute": "query-status", "id": i})
        waiting.append(c)
    oob = raw()
    assert oob.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}
    reply = oob.cmd({"exec-oob": "migrate-pause", "id": "oob"})
    assert reply == {"id": "oob", "error": {"class": "GenericError", "desc": "migrate-pause is currently only "
                                                                            "supported during postcopy-active or "
                                                                            "postcopy-recover state"}}
    with open(fifo, "rb") as f:  # let the in-band work go on
        assert len(f.read()) == 4096
    assert blocker.recv_reply() == {"return": {}, "id": "b"}
    for i, c in enumerate(waiting):
        assert c.recv_reply()["id"] == i


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_costs_bounded_memory(host, raw):
    """Events for a client that does not read are dropped past its queue's bound, and it is told how many."""
    sleeper = raw()
    sleeper.negotiate()  # from now on it gets every event, and reads none
    busy = raw()
    busy.negotiate()

    def stop_cont(n: int, batch: int = 50) -> None:
        """n stop/cont pairs, pipelined ``batch`` pairs at a time (a round trip per batch, not per command)."""
        for _ in range(n // batch):
            for _ in range(batch):
                busy.send({"execute": "stop"})
                busy.send({"execute": "cont"})
            for _ in range(2 * batch):
                assert "error" not in busy.recv_reply()
            busy.events.clear()

    stop_cont(3000)  # fills the sleeper's socket buffer and queue
    before = _rss(host.proc.pid)
    stop_cont(10000)  # 20 000 more events for the sleeper
    grown = _rss(host.proc.pid) - before
    assert grown < 8 << 20, f"host RSS grew by {grown} bytes"
    # the sleeper reads at last: what was queued, then how many events it lost
    sleeper.sock.settimeout(30)
    while True:
        msg = sleeper.recv()
        if msg.get("event") == "MIG_EVENTS_DROPPED":
            assert msg["data"]["count"] > 10000
            break
        assert msg.get("event") in ("STOP", "RESUME"), msg
    assert sleeper.cmd({"execute": "query-status", "id": 1})["id"] == 1


def test_pmemsave_to_a_full_disk_is_an_io_error(raw, tmp_path):
    c = raw()
    c.negotiate()
    reply = c.cmd({"execute": "pmemsave", "arguments": {"val": 0, "size": 1 << 20, "filename": "/dev/full"}})
    assert reply == {"error": {"class": "GenericError", "desc": "An IO error has occurred"}}
    reply = c.cmd({"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": str(tmp_path)}})
    assert reply == {"error": {"class": "GenericError", "desc": f"Could not open '{tmp_path}': Is a directory"}}
    _alive(c, 1)
