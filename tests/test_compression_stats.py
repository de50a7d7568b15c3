"""Compressed multifd between real mig run processes: query-migrate's ``compression`` with QEMU's meaning,
pages that compression would not shrink sent as they are, and the packet checks behind that."""

from __future__ import annotations

import numpy as np
import pytest

from mig_core.engine.multifd_send import PROBE_GAIN, CompressionCounters, packet_pages
from mig_core.errors import MultifdError
from mig_core.ext.channel import BytesChannel
from mig_core.stream.multifd import PacketFlag, pack_header, read_packet
from mig_core.testing import connect, migrate_and_wait, ram_digest, wait_for_status

RAM = 16 << 20
PAGES = RAM // 4096


async def _migrate_stopped(start_host, tmp_path, fill: str, method: str) -> dict:
    """A paused source (nothing is written again, so every page goes exactly once) to a paused destination."""
    s = start_host("--ram", "16M", "--ram-fill", fill, "-S", name="src")
    d = start_host("--ram", "16M", "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
            await c.execute("migrate-set-parameters", {"multifd-channels": 2, "multifd-compression": method})
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        info = await migrate_and_wait(src, {"uri": f"unix:{tmp_path}/m.sock"}, timeout=60)
        assert info["status"] == "completed", info
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s") == await ram_digest(dst, RAM, tmp_path / "d")
        return info
    finally:
        await src.disconnect()
        await dst.disconnect()


@pytest.mark.parametrize("method", ["zstd", "zlib"])
async def test_incompressible_pages_travel_as_they_are(start_host, tmp_path, method):
    """Random pages: the probe finds they do not shrink, so they go uncompressed; QEMU's compression-rate
    (pages × page size / compressed bytes) is then exactly 1.0, and nothing but packet headers is added."""
    info = await _migrate_stopped(start_host, tmp_path, "random", method)
    comp, ram = info["compression"], info["ram"]
    assert comp["pages"] == ram["normal"] >= PAGES - 64  # every page with data, each once (-S: none re-dirtied)
    assert comp["compressed-size"] == comp["pages"] * 4096
    assert comp["compression-rate"] == 1.0
    overhead = ram["multifd-bytes"] - ram["normal-bytes"]
    assert 0 < overhead < ram["normal-bytes"] / 100  # headers and page offsets only
    assert 0 <= comp["busy"] <= ram["normal"] + ram["duplicate"]
    assert 0.0 <= comp["busy-rate"] <= 1.0


@pytest.mark.parametrize("method", ["zstd", "zlib"])
async def test_text_like_pages_compress_and_rate_is_qemus(start_host, tmp_path, method):
    """Text-like pages compress; with every page sent in the first period, compression-rate is that
    period's pages × page size / compressed bytes, as QEMU computes it, and the wire carries the latter."""
    info = await _migrate_stopped(start_host, tmp_path, "text", method)
    comp, ram = info["compression"], info["ram"]
    assert comp["pages"] == ram["normal"] >= PAGES - 64
    assert comp["compressed-size"] < comp["pages"] * 4096 / 20
    assert comp["compression-rate"] == round(comp["pages"] * 4096 / comp["compressed-size"], 4)
    assert ram["multifd-bytes"] < comp["compressed-size"] + ram["normal"] * 8 + (64 << 10)


def test_counters_follow_qemus_periods():
    """busy-rate = busy pages / all pages queued in the period; compression-rate over the period's compressed
    pages, kept by a period that compressed nothing (QEMU's migration_update_rates)."""
    c = CompressionCounters(page_size=4096)
    c.queued(100, busy=False)
    c.queued(100, busy=True)
    c.compressed(150, 150 * 4096 // 10)
    c.period()
    assert (c.busy, c.busy_rate, c.compression_rate) == (100, 0.5, 10.0)
    c.queued(50, busy=False)  # zero pages only: queued, nothing compressed
    c.period()
    assert (c.busy_rate, c.compression_rate) == (0.0, 10.0)
    c.period()  # a period with nothing queued changes nothing
    c.queued(10, busy=False)
    c.compressed(10, 10 * 4096)
    c.period()
    s = c.to_stats()
    assert (s.pages, s.compressed_size, s.compression_rate) == (160, 150 * 4096 // 10 + 10 * 4096, 1.0)


def test_packets_fit_the_cache():
    """Compressed packets hold what compresses to one level-2 cache, 16 to 1024 pages."""
    assert 16 <= packet_pages(4096, 1.0) <= 1024
    assert packet_pages(4096, 1 / 500) == 1024
    assert packet_pages(4096, 0.5) >= packet_pages(4096, 1.0)
    assert packet_pages(2 << 20, 1.0) == 16
    assert 0 < PROBE_GAIN < 0.5


def _packet(flags: int, pages: list[int], payload: bytes = b"") -> bytes:
    offsets = np.array(pages, dtype="<u8").tobytes()
    return pack_header(flags, 1, 0, len(pages), 0, len(payload), 1) + offsets + payload


def test_uncompressed_packet_on_a_compressing_channel_is_read_as_pages():
    pkt = read_packet(BytesChannel(_packet(0, [3, 4])), 0, 1, [16], compressed=True)
    assert not pkt.flags & PacketFlag.COMPRESSED and list(pkt.normal) == [3, 4] and pkt.payload_size == 0


def test_compressed_packet_on_a_plain_channel_is_refused():
    with pytest.raises(MultifdError, match="flags received 2 flags expected 0"):
        read_packet(BytesChannel(_packet(PacketFlag.COMPRESSED, [3])), 0, 1, [16], compressed=False)


@pytest.mark.parametrize("flags", [0x8, 0x12])
def test_unknown_packet_flags_are_refused(flags):
    with pytest.raises(MultifdError, match="unknown packet flags"):
        read_packet(BytesChannel(_packet(flags, [3])), 0, 1, [16], compressed=True)


def test_offset_past_the_block_is_refused():
    with pytest.raises(MultifdError, match=r"offset too long 16 \(max 15\)"):
        read_packet(BytesChannel(_packet(0, [2, 16])), 0, 1, [16], compressed=False)
