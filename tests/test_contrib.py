"""The contrib examples run as documented: two embedding hosts migrate a numpy simulation."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

from mig_core.testing import connect, wait_for_status

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "contrib" / "embedding" / "qmp_host.py"


def start(sock: Path, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(EXAMPLE), str(sock), *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().startswith("serving QMP on")
    return p


async def test_embedding_example_migrates(tmp_path):
    a = start(tmp_path / "a.sock")
    b = start(tmp_path / "b.sock", "--incoming")
    try:
        src, dst = await connect(tmp_path / "a.sock"), await connect(tmp_path / "b.sock")
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await asyncio.sleep(0.3)
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
        assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
        assert (await dst.execute("query-status"))["status"] == "running"  # the simulation goes on there
        for c in (src, dst):
            await c.execute("stop")
        for c in (src, dst):
            with contextlib.suppress(EOFError):  # the host closes the connection as it exits
                await c.execute("quit")
                await c.disconnect()
        out_a, err_a = a.communicate(timeout=10)
        out_b, _ = b.communicate(timeout=10)
        steps_a = int(out_a.split("steps ")[1].split()[0])
        steps_b = int(out_b.split("steps ")[1].split()[0])
        assert steps_b > steps_a > 0  # continued from the migrated count
        assert "host_sees_runstate" in err_a and "state=finish-migrate" in err_a
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
