"""Postcopy over TLS between real ``mig run`` processes: the destination's sessions end in its TLS relay,
so the page server takes over a plain connection; pages on demand, a pause and a recovery whose new
connections are TLS sessions too (checked against tls-authz), and the data exact."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from mig_tls.testing import make_pki

from mig_core.testing import (
    connect,
    pause_and_recover,
    qmp_error,
    ram_digest,
    wait_for_status,
    wait_postcopy_bytes,
    wait_until_async,
)

RAM = 32 << 20
WORKLOAD = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "3", "--dirty-rate", "16M")
CLIENT_DN = "CN=source.mig.test,O=mig tests,C=GB"


def _creds(kind: str, tmp_path, endpoint: str) -> dict:
    if kind == "x509":
        return {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(tmp_path / "pki"), "endpoint": endpoint}
    return {"qom-type": "tls-creds-psk", "id": "tls0", "dir": str(tmp_path / "psk"), "endpoint": endpoint}


async def _postcopy_over_tls(src, dst, tmp_path, caps=(), postcopy_bandwidth=4 << 20) -> None:
    """tls0 on both sides (tls-authz auth0 on the destination), postcopy started, 1 MiB of it sent."""
    await src.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "localhost",
                                                 "max-bandwidth": 8 << 20,
                                                 "max-postcopy-bandwidth": postcopy_bandwidth})
    await dst.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "auth0"})
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": x, "state": True} for x in ("events", "postcopy-ram", *caps)]})
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/pc.sock"})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/pc.sock"})
    await wait_for_status(src, {"active"})
    await src.execute("migrate-start-postcopy")
    await wait_postcopy_bytes(src, 1 << 20)


@pytest.mark.parametrize("kind,caps", [("x509", ()), ("x509", ("multifd", "postcopy-preempt")), ("psk", ())],
                         ids=["x509", "x509-multifd-preempt", "psk"])
async def test_postcopy_over_tls_serves_faults_pauses_and_recovers_exact(start_host, tmp_path, kind, caps):
    make_pki(tmp_path / "pki")
    (tmp_path / "psk").mkdir()
    (tmp_path / "psk" / "keys.psk").write_text("qemu:" + "5e" * 32 + "\n")
    s = start_host(*WORKLOAD, name="src")
    d = start_host(*WORKLOAD, "--incoming", "defer", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    identity = CLIENT_DN if kind == "x509" else "qemu"
    try:
        await src.execute("object-add", _creds(kind, tmp_path, "client"))
        await dst.execute("object-add", _creds(kind, tmp_path, "server"))
        await dst.execute("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": identity})
        await _postcopy_over_tls(src, dst, tmp_path, caps)
        await wait_for_status(dst, {"postcopy-active"})  # paused after the hand-over to the page server

        await pause_and_recover(src, dst, src, f"unix:{tmp_path}/r.sock")
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert done["ram"]["postcopy-requests"] > 0, done  # the running destination asked for pages
        if "multifd" in caps:
            assert done["ram"]["multifd-bytes"] > 0, done

        # every connection was a TLS session that passed tls-authz: the first migration's (main, each multifd
        # channel, preempt) in the host's relay, the recovery's (main, preempt) in the page server's
        per_connection = 1 + (2 if "multifd" in caps else 0) + (1 if "postcopy-preempt" in caps else 0)
        recovered = 1 + (1 if "postcopy-preempt" in caps else 0)
        accepted = [e for e in d.log_events() if e.get("event") == "tls_session_accepted"]
        assert len(accepted) == per_connection + recovered, accepted
        assert "tls_authz_denied" not in d.logs()

        await dst.execute("stop")  # exact except the first word of each page, which the workload writes
        await ram_digest(src, RAM, tmp_path / "s.mem")
        await ram_digest(dst, RAM, tmp_path / "d.mem")
        sm = np.fromfile(tmp_path / "s.mem", np.uint8).reshape(-1, 4096)
        dm = np.fromfile(tmp_path / "d.mem", np.uint8).reshape(-1, 4096)
        assert np.array_equal(sm[1:, 8:], dm[1:, 8:])
        assert "workload_inconsistent" not in d.logs()
    finally:
        for c in (src, dst):
            with contextlib.suppress(Exception):
                await c.disconnect()


async def test_a_recovery_from_a_refused_identity_is_turned_away_and_the_right_one_resumes(start_host, tmp_path):
    """migrate-recover's listener checks tls-authz as it stood at the switch: a source whose certificate
    names someone else fails its resume with the reason, the destination stays paused, and the right
    source then resumes and completes exact."""
    ca = make_pki(tmp_path / "pki")
    make_pki(tmp_path / "other", ca=ca, client_cn="intruder.mig.test")
    s = start_host(*WORKLOAD, name="src")
    d = start_host(*WORKLOAD, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        await src.execute("object-add", _creds("x509", tmp_path, "client"))
        await dst.execute("object-add", _creds("x509", tmp_path, "server"))
        await dst.execute("object-add", {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                                         "rules": [{"match": "CN=source.*", "policy": "allow", "format": "glob"}]})
        await _postcopy_over_tls(src, dst, tmp_path, postcopy_bandwidth=2 << 20)
        await wait_for_status(dst, {"postcopy-active"})  # (a busy destination may still be loading devices)
        await dst.execute("migrate-pause", oob=True)
        await wait_for_status(src, {"postcopy-paused"})
        await wait_for_status(dst, {"postcopy-paused"})
        assert await qmp_error(dst.execute("object-del", {"id": "tls0"})) == \
            "object 'tls0' is in use, can not be deleted"

        # the source resumes with credentials naming another client, of a CA the destination trusts
        await src.execute("object-add", {**_creds("x509", tmp_path, "client"), "id": "tls1",
                                         "dir": str(tmp_path / "other")})
        await src.execute("migrate-set-parameters", {"tls-creds": "tls1"})
        await dst.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r1.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/r1.sock", "resume": True})
        denied = "TLS x509 authz check for CN=intruder.mig.test,O=mig tests,C=GB is denied"
        await wait_until_async(lambda: "postcopy_recover_connect_failed" in s.logs())
        assert [e["error"] for e in s.log_events() if e.get("event") == "postcopy_recover_connect_failed"] == [denied]
        assert (await src.execute("query-migrate"))["status"] == "postcopy-paused"
        assert (await dst.execute("query-migrate"))["status"] == "postcopy-paused"
        assert denied in [e.get("reason") for e in d.log_events() if e.get("event") == "tls_handshake_refused"]

        await src.execute("migrate-set-parameters", {"tls-creds": "tls0", "max-postcopy-bandwidth": 0})
        await dst.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r2.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/r2.sock", "resume": True})
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
    finally:
        for c in (src, dst):
            with contextlib.suppress(Exception):
                await c.disconnect()
