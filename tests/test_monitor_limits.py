"""The QMP monitor keeps to itself: unix sockets only its owner may open (or the mode given), QEMU's
``server``/``wait`` options, anything else refused by name, and a bounded number of clients."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

from mig_core.qmp.server import MAX_CLIENTS
from mig_core.testing import connect, wait_until


def _mode(path) -> int:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode)


async def test_unix_monitors_are_private_unless_a_mode_is_given(start_host, tmp_path):
    shared = tmp_path / "shared.sock"
    h = start_host("--ram", "8M", "--qmp", f"unix:{shared},server=on,wait=off,mode=0660")
    assert _mode(h.sock) == 0o600  # the default: the owner only
    assert _mode(shared) == 0o660
    c = await connect(shared)
    try:
        assert (await c.execute("query-status"))["status"] == "running"
    finally:
        await c.disconnect()


def test_monitor_options_mig_cannot_honour_are_refused(tmp_path):
    for opt, text in [("bogus=1", "unknown monitor option 'bogus=1' (known: server, wait, nowait, mode)"),
                      ("wait=on", "monitor option 'wait=on' is not supported"),
                      ("server=off", "monitor option 'server=off' is not supported"),
                      ("mode=999", "monitor option 'mode=999': an octal file mode such as 0600 is expected")]:
        done = subprocess.run([sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{tmp_path}/m.sock,{opt}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and text in done.stderr, (opt, done.stderr)
        assert not (tmp_path / "m.sock").exists()


def _greeted(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while not data.endswith(b"\n"):
        piece = sock.recv(4096)
        if not piece:
            return data
        data += piece
    return data


async def test_clients_beyond_the_limit_are_closed_and_the_others_served(host):
    clients = []
    try:
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(host.sock))
            assert b'"QMP"' in _greeted(s)
            clients.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.connect(str(host.sock))
        assert _greeted(extra) == b""  # closed without a greeting
        extra.close()
        assert any(e.get("event") == "qmp_client_refused" for e in host.log_events())
        clients.pop().close()  # one leaves: once the host has let it go, the next is served again
        wait_until(lambda: any(e.get("event") == "qmp_client_closed" for e in host.log_events()), timeout=30)
        c = await connect(host.sock)
        try:
            assert (await c.execute("query-status"))["status"] == "running"
        finally:
            await c.disconnect()
    finally:
        for s in clients:
            s.close()
