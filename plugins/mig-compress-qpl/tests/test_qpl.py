"""qpl: QEMU's per-page raw-deflate framing via ISA-L, detection, and a real multifd migration."""

from __future__ import annotations

import os
import struct
import zlib

import mig_compress_qpl
import pytest

from mig_core import PluginRegistry
from mig_core.testing import connect, ram_digest, wait_for_status
from mig_core.testing.contracts import CompressorContract


def codec(page_size=4096):
    comp = PluginRegistry().load("mig_core.compressors", "qpl")(page_size=page_size)
    return comp.encoder(1), comp.decoder()


def test_framing_is_qemus_and_pages_are_raw_deflate():
    enc, dec = codec()
    text = (b"mig page text " * 400)[:4096]
    random = os.urandom(4096)
    wire = enc.compress(text + random + bytes(4096))
    n1, n2, n3 = struct.unpack_from(">3I", wire)
    assert n1 < 4096 and n2 == 4096 and n3 < 100  # the random page travels raw, length = page size
    body = wire[12:]
    # any deflate implementation reads a compressed page (QPL and IAA emit plain RFC 1951)
    assert zlib.decompress(body[:n1], wbits=-15) == text
    assert body[n1:n1 + n2] == random
    assert dec.decompress(wire, 3 * 4096) == text + random + bytes(4096)


@pytest.mark.parametrize("bad", [
    b"\x00\x00\x00\x05garbage",  # a length that runs past the packet
    struct.pack(">I", 0),  # a zero length
    struct.pack(">I", 10) + b"\xff" * 10,  # not deflate
])
def test_corrupt_packets_are_refused(bad):
    _, dec = codec()
    with pytest.raises(ValueError):
        dec.decompress(bad, 4096)


def test_trailing_bytes_and_size_mismatch_are_refused():
    enc, dec = codec()
    wire = enc.compress(bytes(4096))
    with pytest.raises(ValueError, match="after its last page"):
        dec.decompress(wire + b"x", 4096)
    with pytest.raises(ValueError):
        dec.decompress(wire, 8192)  # the packet holds one page, not two
    with pytest.raises(ValueError, match="too short"):
        dec.decompress(wire[:3], 4096)


def test_detection_reports_the_path(tmp_path, monkeypatch):
    support = mig_compress_qpl.detect()
    assert support.library is None  # no libqpl on this machine
    assert "libqpl not found" in support.implementation
    (tmp_path / "wq1.0").write_text("")
    monkeypatch.setenv("MIG_QPL_DEVICES", str(tmp_path / "wq*"))
    assert mig_compress_qpl.detect().devices == (str(tmp_path / "wq1.0"),)
    assert mig_compress_qpl.QplSupport("libqpl.so.1", ("wq",)).implementation.startswith(
        "software (ISA-L): libqpl (libqpl.so.1) and 1 IAA work queue(s) found")


async def test_multifd_migration_with_qpl(start_host, tmp_path):
    wl = ("--ram", "16M", "--ram-fill", "text", "--vcpus", "2", "--dirty-rate", "4M")
    s, d = start_host(*wl, name="src"), start_host(*wl, "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock), await connect(d.sock)
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "multifd", "state": True}, {"capability": "return-path", "state": True}]})
            await c.execute("migrate-set-parameters", {"multifd-compression": "qpl", "multifd-channels": 2})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        info = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        assert info["compression"]["compressed-size"] < info["compression"]["pages"] * 4096 / 2
        assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
        ev = next(e for e in s.log_events() if e.get("event") == "compressor_ready")
        assert ev["implementation"] == "software (ISA-L): libqpl not found"
    finally:
        await src.disconnect()
        await dst.disconnect()


class TestContract(CompressorContract):
    """mig's compressor contract (mig_core.testing.contracts), as every compressor plugin runs it."""

    name = "qpl"
    distribution = "mig-compress-qpl"
    levels = (1,)
