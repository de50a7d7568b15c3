"""Plugin discovery, selection, disabling and failure handling, with real installed distributions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from mig_core.plugin.registry import GROUPS, PluginNotFound, PluginRegistry
from mig_core.testing import Host, connect, wait_until


def make_dist(root: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str]) -> None:
    """Install a distribution the way pip leaves it: a module plus a .dist-info with metadata."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n"
                  for g, items in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


COMPRESSOR_SRC = """
    from mig_core.ext.compressor import Compressor, Encoder, Decoder
    class Same(Encoder, Decoder):
        def compress(self, data): return bytes(data)
        def decompress(self, data, size): return bytes(data)
    class {cls}(Compressor):
        name = "{name}"
        def encoder(self, level): return Same()
        def decoder(self): return Same()
"""


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    make_dist(root, "acme-zstd", "2.0", {"mig_core.compressors": {"zstd": "acme_zstd:FastZstd"}},
              {"acme_zstd": COMPRESSOR_SRC.format(cls="FastZstd", name="zstd")})
    make_dist(root, "acme-lz", "1.1", {"mig_core.compressors": {"lzacme": "acme_lz:Lz"}},
              {"acme_lz": COMPRESSOR_SRC.format(cls="Lz", name="lzacme")})
    make_dist(root, "broken-plugin", "0.1", {"mig_core.compressors": {"lz9": "broken_mod:X"},
                                             "mig_core.hooks": {"broken": "broken_hooks"}},
              {"broken_mod": "raise ImportError('libfoo.so.1: cannot open shared object file')\n",
               "broken_hooks": "raise RuntimeError('hook plugin exploded at import')\n"})
    make_dist(root, "acme-hooks", "1.0", {"mig_core.hooks": {"acme": "acme_hooks"}}, {"acme_hooks": """
        import os
        from mig_core.plugin.hookspecs import hookimpl
        @hookimpl
        def mig_runstate_changed(old, new, running):
            with open(os.environ["ACME_HOOK_LOG"], "a") as f:
                f.write(f"{old.value}->{new.value}\\n")
    """})
    make_dist(root, "typo-hooks", "1.0", {"mig_core.hooks": {"typo": "typo_hooks"}}, {"typo_hooks": """
        import os
        from mig_core.plugin.hookspecs import hookimpl
        @hookimpl
        def mig_runstate_changed(old, new, running):
            with open(os.environ["ACME_HOOK_LOG"], "a") as f:
                f.write("typo plugin was registered\\n")
        @hookimpl
        def mig_swichover(migration_id, side):
            pass
    """})
    return root


@pytest.fixture
def registry(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    for var in ("MIG_PLUGIN_SELECT", "MIG_DISABLED_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MIG_CONFIG", str(site / "absent.toml"))
    return PluginRegistry.from_environment()


def test_listing_knows_distributions(registry):
    zstd = [e for e in registry.entries("mig_core.compressors") if e.name == "zstd"]
    assert [(e.distribution, e.version) for e in zstd] == [("acme-zstd", "2.0"), ("mig-compress-zstd", "0.1.0")]
    assert {"none", "zlib", "zstd", "lzacme", "lz9"} <= set(registry.names("compressors"))


def test_default_choice_is_deterministic_and_selectable(registry):
    assert registry.choice("compressors", "zstd").distribution == "acme-zstd"  # first by distribution name
    registry.select("compressors", "zstd", "mig-compress-zstd")
    assert registry.load("mig_core.compressors", "zstd").__module__ == "mig_compress_zstd"
    registry.select("mig_core.compressors", "zstd", "acme-zstd")
    assert registry.load("mig_core.compressors", "zstd").__module__ == "acme_zstd"


def test_selection_and_disabling_from_environment_and_config(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    cfg = site / "plugins.toml"
    cfg.write_text('disable = ["lzacme"]\n[select]\n"compressors:zstd" = "mig-compress-zstd"\n')
    monkeypatch.setenv("MIG_CONFIG", str(cfg))
    monkeypatch.delenv("MIG_PLUGIN_SELECT", raising=False)
    monkeypatch.setenv("MIG_DISABLED_PLUGINS", "compressors:lz9")
    reg = PluginRegistry.from_environment()
    assert reg.choice("compressors", "zstd").distribution == "mig-compress-zstd"
    assert "lzacme" not in reg.names("compressors") and "lz9" not in reg.names("compressors")
    monkeypatch.setenv("MIG_PLUGIN_SELECT", "compressors:zstd=acme-zstd")  # the environment wins
    assert PluginRegistry.from_environment().choice("compressors", "zstd").distribution == "acme-zstd"
    monkeypatch.setenv("MIG_PLUGIN_SELECT", "zstd")
    with pytest.raises(ValueError, match="not group:name=distribution"):
        PluginRegistry.from_environment()


def test_missing_and_broken_plugins_give_clear_errors(registry):
    with pytest.raises(PluginNotFound) as e:
        registry.load("mig_core.compressors", "lz4")
    assert str(e.value).startswith("no plugin named 'lz4' in group mig_core.compressors (installed: ")
    assert "zlib" in str(e.value)
    with pytest.raises(PluginNotFound) as e:
        registry.load("mig_core.compressors", "lz9")
    assert "from broken-plugin failed to load: ImportError: libfoo.so.1" in str(e.value)
    loaded = registry.load_all("mig_core.compressors")  # the broken one is skipped, the rest load
    assert "lz9" not in loaded and {"none", "zlib", "zstd", "lzacme"} <= set(loaded)


def run_mig(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_mig_plugins_command(site):
    env = dict(os.environ, PYTHONPATH=str(site), MIG_PLUGIN_SELECT="compressors:zstd=mig-compress-zstd",
               MIG_CONFIG=str(site / "absent.toml"))
    out = run_mig("plugins", "--json", "--check", env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    by = {(r["group"], r["name"], r["distribution"]): r for r in rows}
    assert by[("mig_core.compressors", "zstd", "mig-compress-zstd")]["status"] == "selected"
    assert by[("mig_core.compressors", "zstd", "acme-zstd")]["status"] == "shadowed"
    assert by[("mig_core.compressors", "none", "mig-core")]["version"] == "0.1.0"
    broken = by[("mig_core.compressors", "lz9", "broken-plugin")]
    assert broken["status"] == "broken" and "libfoo.so.1" in broken["error"]
    assert {r["group"] for r in rows} <= set(GROUPS)
    text = run_mig("plugins", env=env).stdout
    assert "mig_core.compressors:" in text and "* zstd             mig-compress-zstd 0.1.0  (selected)" in text


async def test_host_survives_broken_plugins_and_uses_the_rest(site, tmp_path):
    hook_log = tmp_path / "hook.log"
    h = Host(tmp_path, name="plugged", env={"PYTHONPATH": str(site), "ACME_HOOK_LOG": str(hook_log),
                                            "MIG_CONFIG": str(site / "absent.toml")})
    try:
        qmp = await connect(h.sock)
        try:
            await qmp.execute("stop")
            await qmp.execute("cont")
            assert wait_until(lambda: hook_log.exists() and hook_log.read_text().count("\n") == 2)
            assert hook_log.read_text() == "running->paused\npaused->running\n"
            # names that installed plugins register extend multifd-compression
            await qmp.execute("migrate-set-parameters", {"multifd-compression": "lzacme"})
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("migrate-set-parameters", {"multifd-compression": "lz4"})
            assert e.value.error.error.desc == "Parameter 'multifd-compression' does not accept value 'lz4'"
            with pytest.raises(ExecuteError) as e:
                await qmp.execute("migrate-set-parameters", {"multifd-compression": "lz9"})
            assert e.value.error.error.desc.startswith(
                "Compression method 'lz9' is installed but cannot be used: plugin 'lz9' in group "
                "mig_core.compressors from broken-plugin failed to load: ImportError: libfoo.so.1")
            assert (await qmp.execute("query-migrate-parameters"))["multifd-compression"] == "lzacme"
        finally:
            await qmp.disconnect()
        skipped = [e for e in h.log_events() if e.get("event") == "hook_plugin_skipped"]
        assert skipped and "hook plugin exploded at import" in skipped[0]["error"]
        # a misspelt hook: the whole plugin is refused, loudly, and none of its hooks runs
        rejected = [e for e in h.log_events() if e.get("event") == "hook_plugin_rejected"]
        assert [e["name"] for e in rejected] == ["typo"] and "mig_swichover" in rejected[0]["error"]
        assert "typo plugin" not in hook_log.read_text()
    finally:
        h.stop()


def test_a_distribution_added_after_a_load_is_found(site, monkeypatch):
    """A plugin loaded earlier in the process does not hide distributions that appear later
    (stevedore caches a group's entry points for the whole process)."""
    PluginRegistry.from_environment().load("mig_core.compressors", "zlib")
    monkeypatch.syspath_prepend(str(site))
    reg = PluginRegistry.from_environment()
    assert reg.load("mig_core.compressors", "lzacme").name == "lzacme"
    reg.rescan()
    assert reg.load("mig_core.compressors", "lzacme").name == "lzacme"
