"""uadk: per-page zlib framing in software, raw pages from a sender without hardware, and a migration."""

from __future__ import annotations

import os
import struct
import zlib

import mig_compress_uadk
import pytest

from mig_core import PluginRegistry
from mig_core.testing import connect, ram_digest, wait_for_status
from mig_core.testing.contracts import CompressorContract


def codec(page_size=4096):
    comp = PluginRegistry().load("mig_core.compressors", "uadk")(page_size=page_size)
    return comp.encoder(1), comp.decoder()


def test_pages_are_zlib_and_incompressible_ones_raw():
    enc, dec = codec()
    text = (b"uadk text " * 500)[:4096]
    random = os.urandom(4096)
    wire = enc.compress(text + random)
    n1, n2 = struct.unpack_from(">2I", wire)
    assert n1 < 4096 and n2 == 4096
    assert zlib.decompress(wire[8:8 + n1]) == text  # a zlib stream, as UADK's "zlib" algorithm emits
    assert dec.decompress(wire, 8192) == text + random


def test_reads_a_sender_without_hardware():
    """QEMU without a UADK device sends every page raw (length = page size): mig decodes that too."""
    _, dec = codec()
    pages = os.urandom(4096) + bytes(4096)
    assert dec.decompress(struct.pack(">2I", 4096, 4096) + pages, 8192) == pages


def test_corrupt_page_is_refused():
    _, dec = codec()
    with pytest.raises(ValueError, match="corrupt uadk page"):
        dec.decompress(struct.pack(">I", 8) + b"\x78\x9c\xff\xff\xff\xff\xff\xff", 4096)


def test_detection_reports_the_path(tmp_path, monkeypatch):
    assert "UADK library (libwd_comp) not found" in mig_compress_uadk.detect().implementation
    (tmp_path / "hisi_zip-0").mkdir()
    monkeypatch.setenv("MIG_UADK_DEVICES", str(tmp_path / "*"))
    assert mig_compress_uadk.detect().devices == (str(tmp_path / "hisi_zip-0"),)
    assert "no UADK device" in mig_compress_uadk.UadkSupport("libwd_comp.so.2", ()).implementation


async def test_multifd_migration_with_uadk(start_host, tmp_path):
    wl = ("--ram", "16M", "--ram-fill", "text", "--vcpus", "2", "--dirty-rate", "4M")
    s, d = start_host(*wl, name="src"), start_host(*wl, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "multifd", "state": True}, {"capability": "return-path", "state": True}]})
            await c.execute("migrate-set-parameters", {"multifd-compression": "uadk", "multifd-channels": 2})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        assert info["compression"]["compression-rate"] > 2
        assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
    finally:
        await src.disconnect()
        await dst.disconnect()


class TestContract(CompressorContract):
    """mig's compressor contract (mig_core.testing.contracts), as every compressor plugin runs it."""

    name = "uadk"
    distribution = "mig-compress-uadk"
    levels = (1,)
