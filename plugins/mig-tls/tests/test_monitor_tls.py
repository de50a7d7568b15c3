"""A tcp QMP monitor over TLS (``--qmp tcp:HOST:PORT,tls-creds=ID[,tls-authz=ID]``, as QEMU's socket chardev):
a real ``qemu.qmp`` client with TLS is served; a plain client, an unknown certificate and a name the
authz object refuses are turned away without disturbing the monitor; the credentials cannot be deleted
while the monitor uses them. Both a plain host and a destination (whose monitor runs in a front process)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from mig_tls.testing import Authority, make_pki
from qemu.qmp import QMPClient

from mig_core.testing import connect, qmp_error, wait_until

CLIENT_DN = "CN=source.mig.test,O=mig tests,C=GB"


@pytest.fixture(autouse=True)
def _drain_without_a_zero_high_water_mark(monkeypatch):
    """qemu.qmp flushes at disconnect by setting the write buffer's high-water mark to 0 and draining.
    asyncio's TLS transport (seen in Python 3.11) then pauses writing with an empty buffer (``size >= high``) and never
    resumes, so ``disconnect()`` over TLS hangs, whatever the server (asyncio/sslproto.py,
    ``_control_app_writing``). The client drains plainly here; the server is not involved."""
    import qemu.qmp.protocol

    async def drain(writer: asyncio.StreamWriter) -> None:
        await writer.drain()

    monkeypatch.setattr(qemu.qmp.protocol, "flush", drain)


def client_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki / "client-cert.pem"), str(pki / "client-key.pem"))
    return ctx


async def tls_client(port: int, pki: Path) -> QMPClient:
    client = QMPClient("tls")
    await client.connect(("127.0.0.1", port), ssl=client_context(pki))
    return client


async def refused(port: int, pki: Path) -> None:
    """A TLS client the monitor turns away: the connection closes before QMP's greeting."""
    client = QMPClient("refused")
    with pytest.raises(Exception):  # noqa: B017 - qemu.qmp reports a closed connection as ConnectError/EOFError
        await asyncio.wait_for(client.connect(("127.0.0.1", port), ssl=client_context(pki)), 20)


def port_of(host) -> int:
    (tcp,) = [m for m in host.monitors if m.startswith("tcp:")]
    return int(tcp.rsplit(":", 1)[1])


@pytest.mark.parametrize("incoming", [False, True], ids=["host", "destination-front"])
async def test_a_tls_monitor_serves_tls_clients_and_turns_away_the_rest(start_host, tmp_path, incoming):
    ca = make_pki(tmp_path / "pki")
    make_pki(tmp_path / "intruder", ca=ca, client_cn="intruder.mig.test")  # same CA, a name not allowed
    make_pki(tmp_path / "foreign", trust=Authority("another CA"))  # a client of another CA
    pki = tmp_path / "pki"
    h = start_host("--ram", "8M", f"--object=tls-creds-x509,id=mon0,dir={pki},endpoint=server",
                   f"--object=authz-simple,id=auth0,identity={CLIENT_DN.replace(',', ',,')}",
                   "--qmp", "tcp:127.0.0.1:0,tls-creds=mon0,tls-authz=auth0",
                   *(("--incoming", "defer") if incoming else ()), name="host")
    port = port_of(h)
    qmp = await tls_client(port, pki)
    try:
        assert (await qmp.execute("query-status"))["status"] in ("running", "inmigrate")
        # a plain client: the handshake fails, nothing is served
        with socket.create_connection(("127.0.0.1", port), timeout=20) as plain:
            plain.sendall(b'{"execute": "qmp_capabilities"}\n')
            assert b"QMP" not in plain.recv(4096)
        await refused(port, tmp_path / "intruder")  # its name is not the one auth0 allows
        await refused(port, tmp_path / "foreign")  # its certificate is not one the monitor's CA signed
        # the monitor logs each refusal when its side of the handshake ends, which may be after the client's
        def refusals() -> tuple[int, int]:
            events = [e for e in h.log_events() if e.get("event", "").startswith("qmp_tls_")]
            return (sum(e["event"] == "qmp_tls_refused" and "intruder.mig.test" in e["reason"] for e in events),
                    sum(e["event"] == "qmp_tls_handshake_failed" for e in events))
        wait_until(lambda: refusals()[0] >= 1 and refusals()[1] >= 2, timeout=30)
        # the monitor serves on, and holds its objects
        again = await tls_client(port, pki)
        assert await qmp_error(again.execute("object-del", {"id": "mon0"})) == \
            "object 'mon0' is in use, can not be deleted"
        assert await qmp_error(again.execute("object-del", {"id": "auth0"})) == \
            "object 'auth0' is in use, can not be deleted"
        await again.disconnect()
        unix = await connect(h.sock, "unix")  # the unix monitor beside it stays plain
        assert "status" in await unix.execute("query-status")
        await unix.disconnect()
    finally:
        await qmp.disconnect()


def test_monitor_tls_options_are_checked_at_start(tmp_path):
    pki = tmp_path / "pki"
    make_pki(pki)
    run = [sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{tmp_path}/m.sock",
           f"--object=tls-creds-x509,id=cli0,dir={pki},endpoint=client", "--qmp"]
    for monitor, text in (("tcp:127.0.0.1:0,tls-creds=nope", "No TLS credentials with id 'nope'"),
                          ("tcp:127.0.0.1:0,tls-creds=cli0", "Expected TLS credentials for a server endpoint"),
                          ("tcp:127.0.0.1:0,tls-authz=a", "monitor option 'tls-authz' needs 'tls-creds'"),
                          (f"unix:{tmp_path}/x.sock,tls-creds=cli0", "unknown monitor option 'tls-creds=cli0'")):
        done = subprocess.run(run + [monitor], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and text in done.stderr, (monitor, done.stderr)
