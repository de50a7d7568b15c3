"""The contrib examples run as documented: two embedding hosts migrate a numpy simulation."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from mig_core.testing import Host, connect, qmp_error, ram_digest, wait_for_status

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


# -- the third-party compressor plugin, installed into a throwaway virtual environment -----------

CONTRIB_PLUGIN = REPO / "contrib" / "mig-compress-contrib"


@pytest.fixture(scope="module")
def contrib_python(tmp_path_factory) -> str:
    """A new virtual environment that sees this one's packages (mig-core and its plugins) and has the
    contrib plugin installed on top with pip, as a user would install it."""
    venv = tmp_path_factory.mktemp("contrib") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages")]
    # addsitedir (not a bare path) so the parent's editable installs (.pth files) work too
    Path(site_dir, "_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--disable-pip-version-check", str(CONTRIB_PLUGIN)], check=True)
    # installed there, not here: this environment is untouched
    assert subprocess.run([sys.executable, "-c", "import mig_compress_contrib"], capture_output=True).returncode
    return str(python)


def _compression_event(host) -> dict:
    return next(e for e in host.log_events()
                if e.get("event") == "extension_selected" and e.get("group") == "mig_core.compressors")


@pytest.mark.parametrize("case", ["lz4", "zstd-cross"])
async def test_third_party_compressor_plugin(start_host, tmp_path, contrib_python, case):
    """lz4: a name QEMU lacks, accepted because the plugin registers it. zstd-cross: the source uses the
    contrib zstd, the destination the first-party one, each chosen through entry-point selection."""
    method = "lz4" if case == "lz4" else "zstd"
    src_env = {"MIG_PLUGIN_SELECT": "compressors:zstd=mig-compress-contrib"}
    dst_env = {"MIG_PLUGIN_SELECT": "compressors:zstd=mig-compress-zstd"}
    wl = ("--ram", "16M", "--ram-fill", "text", "--vcpus", "2", "--dirty-rate", "4M")
    s = Host(tmp_path, *wl, name="src", env=src_env, python=contrib_python)
    d = Host(tmp_path, *wl, "--incoming", "defer", "-S", name="dst", env=dst_env, python=contrib_python)
    try:
        src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
        caps = {"capabilities": [{"capability": "multifd", "state": True}, {"capability": "return-path",
                                                                              "state": True}]}
        params = {"multifd-channels": 2, "multifd-compression": method}
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", caps)
            await c.execute("migrate-set-parameters", params)
            assert (await c.execute("query-migrate-parameters"))["multifd-compression"] == method
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
        assert info["compression"]["compressed-size"] < info["compression"]["pages"] * 4096 / 2
        src_ev, dst_ev = _compression_event(s), _compression_event(d)
        assert src_ev["distribution"] == "mig-compress-contrib"
        assert dst_ev["distribution"] == ("mig-compress-contrib" if case == "lz4" else "mig-compress-zstd")
        await src.disconnect()
        await dst.disconnect()
    finally:
        s.stop()
        d.stop()


async def test_plugin_name_unknown_without_the_plugin(host, qmp):
    """In the environment without the contrib plugin, lz4 is not a compression method."""
    desc = await qmp_error(qmp.execute("migrate-set-parameters", {"multifd-compression": "lz4"}))
    assert desc == "Parameter 'multifd-compression' does not accept value 'lz4'"
