"""The contrib examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mig_core.testing import RawQMP

REPO = Path(__file__).resolve().parent.parent


def test_embedding_example(tmp_path):
    sock = tmp_path / "h.sock"
    proc = subprocess.Popen([sys.executable, str(REPO / "contrib" / "embedding" / "qmp_host.py"), str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("serving QMP on")
        c = RawQMP(sock)
        c.negotiate()
        assert c.cmd({"execute": "stop"}) == {"return": {}}
        assert c.cmd({"execute": "cont"}) == {"return": {}}
        assert c.cmd({"execute": "quit"}) == {"return": {}}
        c.close()
        assert proc.wait(10) == 0
        assert proc.stdout.readline().startswith("worked ")
        err = proc.stderr.read()
        assert "host_sees_runstate" in err and "state=paused" in err and "state=running" in err
    finally:
        proc.kill()
        proc.wait()
