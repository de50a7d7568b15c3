"""TLS migrations between real ``mig run`` processes: credentials objects, exact data over one and over
several channels, and every refusal with its reason, the destination ready for the next source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mig_tls.testing import Authority, make_pki

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status

RAM = 16 << 20
WL = ("--ram", "16M", "--ram-fill", "random")
CLIENT_DN = "CN=source.mig.test,O=mig tests,C=GB"


def x509(oid: str, directory: Path, endpoint: str, **extra: object) -> dict:
    return {"qom-type": "tls-creds-x509", "id": oid, "dir": str(directory), "endpoint": endpoint, **extra}


async def hosts_with(start_host, src_creds: dict, dst_creds: dict):
    """A source and a destination, each with its credentials object ``tls0`` and ``tls-creds`` set."""
    s = start_host(*WL, name="src")
    d = start_host(*WL, "--incoming", "defer", "-S", name="dst")  # paused after: its RAM stays the source's
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    await src.execute("object-add", src_creds)
    await dst.execute("object-add", dst_creds)
    for c in (src, dst):
        await c.execute("migrate-set-parameters", {"tls-creds": "tls0"})
    return s, d, src, dst


async def pair(start_host, tmp_path, src_dir: Path, dst_dir: Path, src_extra=(), dst_extra=()):
    return await hosts_with(start_host, x509("tls0", src_dir, "client", **dict(src_extra)),
                            x509("tls0", dst_dir, "server", **dict(dst_extra)))


async def listen(dst) -> int:
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    (addr,) = (await dst.execute("query-migrate"))["socket-address"]
    return int(addr["port"])


async def migrate_and_compare(src, dst, port: int, tmp_path: Path) -> dict:
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
    return info


async def still_waiting_then_exact(src, dst, port: int, tmp_path: Path) -> None:
    """After refusals the destination still listens, and a source with the right credentials migrates exact."""
    assert (await dst.execute("query-migrate"))["status"] == "setup"
    await migrate_and_compare(src, dst, port, tmp_path)


async def refused(src, port: int) -> str:
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
    assert info["status"] == "failed", info
    assert (await src.execute("query-status"))["status"] == "running"
    return info["error-desc"]


@pytest.mark.parametrize("channels", [0, 4])
async def test_tls_migration_is_exact(start_host, tmp_path, channels):
    make_pki(tmp_path / "pki")
    s, d, src, dst = await pair(start_host, tmp_path, tmp_path / "pki", tmp_path / "pki")
    try:
        caps = ["return-path"] + (["multifd"] if channels else [])
        for c in (src, dst):
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": x, "state": True} for x in caps]})
            if channels:
                await c.execute("migrate-set-parameters", {"multifd-channels": channels})
        await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})  # still running: object in use
        port = await listen(dst)
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await wait_for_status(src, {"active"})
        assert await qmp_error(src.execute("object-del", {"id": "tls0"})) == \
            "object 'tls0' is in use, can not be deleted"
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
        handshakes = [e for e in d.log_events() if e.get("event") == "tls_session_accepted"]
        assert len(handshakes) == 1 + channels  # every channel had its own session
        await src.execute("object-del", {"id": "tls0"})  # the migration is over: free again
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_credentials_objects_with_qemus_errors(start_host, tmp_path):
    make_pki(tmp_path / "pki")
    h = start_host(*WL)
    c = await connect(h.sock)
    try:
        err = lambda args: qmp_error(c.execute("object-add", args))  # noqa: E731
        assert await err({"qom-type": "tls-creds-x509", "id": "t", "endpoint": "client"}) == \
            "Missing 'dir' property value"
        assert await err(x509("t", tmp_path / "none", "client")) == \
            f"Unable to access credentials {tmp_path}/none/ca-cert.pem: No such file or directory"
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "ca-cert.pem").write_bytes((tmp_path / "pki" / "ca-cert.pem").read_bytes())
        assert await err(x509("t", tmp_path / "half", "server")) == \
            f"Unable to access credentials {tmp_path}/half/server-cert.pem: No such file or directory"
        assert await err(x509("t", tmp_path / "pki", "sideways")) == \
            "Parameter 'endpoint' does not accept value 'sideways'"
        assert await err(x509("9t", tmp_path / "pki", "client")) == "Parameter 'id' expects an identifier"
        assert (await err(x509("t", tmp_path / "pki", "client", priority="NORMAL"))).startswith(
            "Property 'priority' is not supported")
        assert await err({"qom-type": "memory-backend-ram", "id": "m"}) == \
            "Parameter 'qom-type' does not accept value 'memory-backend-ram'"
        make_pki(tmp_path / "old", server_expired=True)
        assert await err(x509("t", tmp_path / "old", "server")) == \
            f"The server certificate {tmp_path}/old/server-cert.pem has expired"
        make_pki(tmp_path / "foreign", trust=Authority("another CA"))
        assert await err(x509("t", tmp_path / "foreign", "client")) == (
            f"Our own certificate {tmp_path}/foreign/client-cert.pem failed validation against "
            f"{tmp_path}/foreign/ca-cert.pem: The certificate hasn't got a known issuer")

        await c.execute("object-add", x509("t", tmp_path / "pki", "client"))
        assert await err(x509("t", tmp_path / "pki", "client")) == \
            "attempt to add duplicate property 't' to object (type 'container')"
        await c.execute("object-add", {"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
        await c.execute("object-del", {"id": "a"})
        assert await qmp_error(c.execute("object-del", {"id": "a"})) == "object 'a' not found"

        # a migration with credentials that cannot serve it fails with QEMU's texts
        await c.execute("migrate-set-parameters", {"tls-creds": "nope"})
        await c.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert (await wait_for_status(c, {"failed"}))["error-desc"] == "No TLS credentials with id 'nope'"
        await c.execute("object-add", {"qom-type": "authz-list", "id": "z"})
        await c.execute("migrate-set-parameters", {"tls-creds": "z"})
        await c.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert (await wait_for_status(c, {"failed"}))["error-desc"] == "Object with id 'z' is not TLS credentials"
        assert await qmp_error(c.execute("migrate", {"uri": "file:/tmp/x"})) == \
            "TLS is not supported with the file transport: a file is no peer to hold a session with"
    finally:
        await c.disconnect()


async def test_wrong_endpoint_and_missing_hostname(start_host, tmp_path):
    make_pki(tmp_path / "pki")
    s, d, src, dst = await pair(start_host, tmp_path, tmp_path / "pki", tmp_path / "pki")
    try:
        await src.execute("object-add", x509("srv", tmp_path / "pki", "server"))
        await src.execute("migrate-set-parameters", {"tls-creds": "srv"})
        await src.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert (await wait_for_status(src, {"failed"}))["error-desc"] == \
            "Expected TLS credentials for a client endpoint"
        await src.execute("migrate-set-parameters", {"tls-creds": "tls0"})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/in.sock", "exit-on-error": False})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/in.sock"})
        assert (await wait_for_status(src, {"failed"}))["error-desc"] == "No hostname for certificate validation"
        # with tls-hostname the unix socket carries the session, to the same waiting destination
        await src.execute("migrate-set-parameters", {"tls-hostname": "localhost"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/in.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("relayed", [False, True], ids=["in-process", "relayed"])
async def test_each_refusal_names_its_reason_and_the_destination_waits_for_the_next(start_host, tmp_path, relayed):
    """Relayed: with postcopy-ram the destination's sessions end in the TLS relay, whose refusals read the same."""
    ca = make_pki(tmp_path / "pki")
    make_pki(tmp_path / "foreign", trust=Authority("another CA"))  # a source that trusts another CA
    make_pki(tmp_path / "expired", ca=ca, client_expired=True)
    s, d, src, dst = await pair(start_host, tmp_path, tmp_path / "foreign", tmp_path / "pki",
                                src_extra={"sanity-check": False})
    try:
        if relayed:
            for c in (src, dst):
                await c.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await dst.execute("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny", "rules": [
            {"match": "CN=*.elsewhere.test,*", "policy": "allow", "format": "glob"}]})
        await dst.execute("migrate-set-parameters", {"tls-authz": "auth0"})
        port = await listen(dst)

        # 1. the destination's certificate is not signed by the CA the source trusts
        assert await refused(src, port) == "The certificate hasn't got a known issuer"

        async def creds(directory: Path, **extra: object) -> None:
            await src.execute("object-del", {"id": "tls0"})
            await src.execute("object-add", x509("tls0", directory, "client", **extra))
        await creds(tmp_path / "pki")

        # 2. the name the source dials is not the certificate's
        await src.execute("migrate-set-parameters", {"tls-hostname": "elsewhere.test"})
        assert await refused(src, port) == "Certificate does not match the hostname elsewhere.test"
        await src.execute("migrate-set-parameters", {"tls-hostname": ""})

        # 3. the source's name is not in the destination's authz list
        assert await refused(src, port) == f"TLS x509 authz check for {CLIENT_DN} is denied"

        # 4. an expired source certificate (its own sanity check off): the destination refuses the session
        await dst.execute("object-del", {"id": "auth0"})
        await dst.execute("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
        await creds(tmp_path / "expired", **{"sanity-check": False})
        text = await refused(src, port)
        assert text.startswith("TLS handshake failed: the peer refused the session") and "expired" in text, text
        reasons = [e["reason"] for e in d.log_events() if e.get("event") == "tls_handshake_refused"]
        assert "The certificate has expired" in reasons, reasons

        # the destination waited through all of it: the right credentials migrate exactly
        await creds(tmp_path / "pki")
        await still_waiting_then_exact(src, dst, port, tmp_path)
        assert ("tls_relay_started" in d.logs()) == relayed
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_objects_from_the_command_line(start_host, tmp_path):
    make_pki(tmp_path / "pki")
    pki = tmp_path / "pki"
    allow = json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                        "rules": [{"match": "CN=source.*", "policy": "allow", "format": "glob"}]})
    s = start_host(*WL, f"--object=tls-creds-x509,id=tls0,dir={pki},endpoint=client,verify-peer=on",
                   "--param", "tls-creds=tls0", name="src")
    d = start_host(*WL, f"--object=tls-creds-x509,id=tls0,dir={pki},endpoint=server", f"--object={allow}",
                   "--param", "tls-creds=tls0", "--param", "tls-authz=auth0", "--incoming", "defer", "-S",
                   name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        await migrate_and_compare(src, dst, await listen(dst), tmp_path)
    finally:
        await src.disconnect()
        await dst.disconnect()
    run = [sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{tmp_path}/never.sock", "--object"]
    bad = subprocess.run(run + ["tls-creds-x509,id=t,verify-peer=maybe"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'verify-peer=maybe': a boolean is on or off" in bad.stderr, bad.stderr
    bad = subprocess.run(run + [f"tls-creds-x509,id=t,dir={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and \
        f"Unable to access credentials {tmp_path}/ca-cert.pem: No such file or directory" in bad.stderr, bad.stderr


@pytest.mark.parametrize("relayed", [False, True], ids=["in-process", "relayed"])
async def test_a_bit_flipped_on_the_way_fails_the_session(start_host, tmp_path, relayed):
    """TLS authenticates every record: a proxy that flips one bit of page data breaks the session (a plain
    link would carry it into the destination's RAM; see test_network_faults). With postcopy-ram the
    destination's session ends in the TLS relay process, and its reason still reaches the host."""
    from mig_core.testing.fault_proxy import ProxyProcess

    make_pki(tmp_path / "pki")
    s, d, src, dst = await pair(start_host, tmp_path, tmp_path / "pki", tmp_path / "pki")
    try:
        if relayed:
            for c in (src, dst):
                await c.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await src.execute("stop")
        before = await ram_digest(src, RAM, tmp_path / "before.mem")
        port = await listen(dst)
        proxy = ProxyProcess(f"127.0.0.1:{port}", "corrupt", at=(4 << 20) + 4321)
        try:
            await src.execute("migrate-set-parameters", {"tls-hostname": "127.0.0.1"})
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
            assert proxy.fired()
            info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
            assert info["status"] == "failed", info
            dst_info = await wait_for_status(dst, {"completed", "failed"})
            # a flip in a record's body fails its authentication; one in a record's 5-byte header (0.03 % of
            # the stream) breaks the record layer instead: refused either way
            desc = dst_info["error-desc"]
            assert dst_info["status"] == "failed" and "TLS receive failed" in desc, dst_info
            assert ("tls_relay_session_failed" in d.logs()) == relayed
        finally:
            proxy.stop()
        assert (await src.execute("query-status"))["status"] == "paused"
        assert await ram_digest(src, RAM, tmp_path / "after.mem") == before
    finally:
        await src.disconnect()
        await dst.disconnect()


# -- pre-shared keys ----------------------------------------------------------------------------------------

KEY = "0123456789abcdef0123456789abcdef"


def psk_dir(path: Path, *lines: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "keys.psk").write_text("".join(f"{line}\n" for line in lines))
    return path


def psk(oid: str, directory: Path, endpoint: str, **extra: object) -> dict:
    return {"qom-type": "tls-creds-psk", "id": oid, "dir": str(directory), "endpoint": endpoint, **extra}


async def psk_pair(start_host, src_dir: Path, dst_dir: Path):
    return await hosts_with(start_host, psk("tls0", src_dir, "client"), psk("tls0", dst_dir, "server"))


@pytest.mark.parametrize("channels", [0, 2])
async def test_psk_migration_is_exact_without_a_hostname(start_host, tmp_path, channels):
    keys = psk_dir(tmp_path / "keys", f"qemu:{KEY}")
    s, d, src, dst = await psk_pair(start_host, keys, keys)
    try:
        if channels:
            for c in (src, dst):
                await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd",
                                                                               "state": True}]})
                await c.execute("migrate-set-parameters", {"multifd-channels": channels})
        # a unix socket has no host name, and PSK needs none (an x509 source would refuse)
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/psk.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/psk.sock"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
        assert any(e.get("event") == "tls_session_accepted" for e in d.log_events())
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_psk_refusals_name_their_reason_and_the_destination_waits(start_host, tmp_path):
    server = psk_dir(tmp_path / "server", f"qemu:{KEY}", f"intruder:{KEY}")
    s, d, src, dst = await psk_pair(start_host, psk_dir(tmp_path / "wrong", "qemu:" + "ff" * 16), server)
    try:
        await dst.execute("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": "qemu"})
        await dst.execute("migrate-set-parameters", {"tls-authz": "auth0"})
        port = await listen(dst)

        async def creds(directory: Path, **extra: object) -> None:
            await src.execute("object-del", {"id": "tls0"})
            await src.execute("object-add", psk("tls0", directory, "client", **extra))

        # 1. the same username, another key
        assert await refused(src, port) == "TLS handshake failed: the pre-shared keys do not match"
        # 2. a username the destination has no key for
        await creds(psk_dir(tmp_path / "stranger", f"stranger:{KEY}"), username="stranger")
        assert await refused(src, port) == "TLS handshake failed: the server has no pre-shared key for this username"
        # 3. a username the destination knows, but its authz object does not allow
        await creds(psk_dir(tmp_path / "intruder", f"intruder:{KEY}"), username="intruder")
        assert await refused(src, port) == "TLS PSK authz check for intruder is denied"
        # the destination waited through all of it
        await creds(psk_dir(tmp_path / "right", f"qemu:{KEY}"))
        await still_waiting_then_exact(src, dst, port, tmp_path)
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_psk_objects_with_their_errors(start_host, tmp_path):
    h = start_host(*WL, name="h")
    qmp = await connect(h.sock, "h")
    try:
        keys = psk_dir(tmp_path / "keys", f"qemu:{KEY}")
        for args, text in (
            ({"qom-type": "tls-creds-psk", "id": "p", "endpoint": "client"}, "Missing 'dir' property value"),
            (psk("p", tmp_path, "client"),
             f"Unable to access credentials {tmp_path}/keys.psk: No such file or directory"),
            (psk("p", keys, "client", username="nobody"), f"Username 'nobody' not found in PSK file {keys}/keys.psk"),
            (psk("p", keys, "server", username="qemu"), "Property 'username' is for client credentials: a server "
                                                        "looks the client's up in its keys file"),
            (psk("p", psk_dir(tmp_path / "bad", "qemu:zz"), "client"), f"{tmp_path}/bad/keys.psk line 1: expected "
                                                                        "username:hexkey"),
        ):
            assert await qmp_error(qmp.execute("object-add", args)) == text, args
        await qmp.execute("object-add", psk("p", keys, "client"))
        await qmp.execute("object-del", {"id": "p"})
    finally:
        await qmp.disconnect()
