"""Compressed multifd between real mig run processes: query-migrate's ``compression`` with QEMU's meaning,
pages that compression would not shrink sent as they are, and the packet checks behind that."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid

import numpy as np
import pytest

from mig_core.engine.multifd_send import PROBE_GAIN, PROBE_PAGES, CompressionCounters, MultifdSender, packet_pages
from mig_core.engine.stats import MigrationCounters
from mig_core.errors import MultifdError
from mig_core.ext import compressor
from mig_core.ext.channel import SocketChannel
from mig_core.ext.memory_channel import BytesChannel
from mig_core.machine.machine import Machine
from mig_core.machine.reference_host import fill
from mig_core.plugin.registry import PluginRegistry
from mig_core.stream.multifd import PacketFlag, pack_header, read_packet
from mig_core.testing import connect, migrate_and_wait, ram_digest, wait_for_status
from mig_core.testing.multifd_sink import receive_channel

RAM = 16 << 20
PAGES = RAM // 4096


async def _migrate_stopped(start_host, tmp_path, fill: str, method: str, in_place: list | None = None) -> dict:
    """A paused source (nothing is written again, so every page goes exactly once) to a paused destination;
    ``in_place`` receives the source's ``multifd_in_place`` event."""
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
        if in_place is not None:
            for _ in range(600):  # logged as the channels end, which may follow the status by a moment
                in_place += [e for e in s.log_events() if e["event"] == "multifd_in_place"]
                if in_place:
                    break
                await asyncio.sleep(0.05)
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
    in_place: list[dict] = []
    info = await _migrate_stopped(start_host, tmp_path, "text", method, in_place)
    comp, ram = info["compression"], info["ram"]
    assert comp["pages"] == ram["normal"] >= PAGES - 64
    assert comp["compressed-size"] < comp["pages"] * 4096 / 20
    assert comp["compression-rate"] == round(comp["pages"] * 4096 / comp["compressed-size"], 4)
    assert ram["multifd-bytes"] < comp["compressed-size"] + ram["normal"] * 8 + (64 << 10)
    # nothing writes a paused source's RAM: uffd-wp proves it, so every packet was compressed in place
    assert in_place and in_place[0]["kept"] > 0 and in_place[0]["redone"] == in_place[0]["copied"] == 0, in_place


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
    """Compressed packets hold what compresses to one level-2 cache, 16 to 4096 pages (a whole 16 MiB job)."""
    assert 16 <= packet_pages(4096, 1.0) <= 1024
    assert packet_pages(4096, 1 / 5000) == 4096
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


class _Watched:
    """The real zstd encoder, recording the size of every input it is given (a probe's is PROBE_PAGES pages)."""

    def __init__(self, inner) -> None:
        self.inner, self.independent, self.sizes = inner, inner.independent, []

    def compress_parts(self, data):
        self.sizes.append(memoryview(data).nbytes)
        return self.inner.compress_parts(data)

    def compress_parts_stable(self, data):  # a probe's gathered copy, or live RAM a tracker proved unwritten
        self.sizes.append(memoryview(data).nbytes)
        return self.inner.compress_parts_stable(data)


def test_a_channel_probes_until_its_jobs_compress_and_again_once_one_did_not():
    """A probe gathers pages from across a job and compresses them as a frame of its own, so a channel whose
    last job compressed well skips it. A job that then does not compress still goes out as it is (packet by
    packet), the channel probes the next one, and every page arrives as it was (issue 21)."""
    job = 1024
    kinds = ["text", "text", "text", "random", "random", "text", "text"]
    m = Machine()
    m.add_ram("pc.ram", len(kinds) * job * 4096)
    fill(m, "text")
    block = m.blocks[0]
    rng = np.random.default_rng(5)
    for j, kind in enumerate(kinds):
        if kind == "random":
            block.array[j * job * 4096:(j + 1) * job * 4096] = rng.integers(0, 256, job * 4096, dtype=np.uint8)
    comp = compressor.load(PluginRegistry.from_environment(), "zstd", 4096)
    encoders: list[_Watched] = []
    a, b = socket.socketpair()
    sender = MultifdSender([SocketChannel(a)], str(uuid.uuid4()), MigrationCounters(),
                           lambda: encoders.append(_Watched(comp.encoder(1))) or encoders[-1],
                           detect_zero=True, zero_copy=False)
    landed = np.zeros_like(block.array)
    packets: list[tuple[int, np.ndarray]] = []

    def receive() -> None:
        packets.extend(receive_channel(b, comp.decoder(), block.npages, landed))

    receiver = threading.Thread(target=receive)
    receiver.start()
    sender.start()
    for j in range(len(kinds)):
        sender.send(0, block, np.arange(j * job, (j + 1) * job), None, 1, lambda: None)
        sender.sync(1, lambda: None)  # one job at a time: the channel's history is the jobs' order
    sender.finish()
    receiver.join(30)
    sender.close()
    b.close()

    # what the encoder was given: a probe, jobs 0-3 each in one packet (job 3 trusted on job 2's ratio, then sent
    # as it is), probes of jobs 4 (no gain: sent as it is) and 5, then jobs 5 and 6 in full
    sizes = encoders[0].sizes
    probe = PROBE_PAGES * 4096
    assert [i for i, size in enumerate(sizes) if size == probe] == [0, 5, 6], sizes
    assert len(sizes) == 9 and all(size >= (job - 1) * 4096 for i, size in enumerate(sizes) if i not in (0, 5, 6))
    flags = [f for f, _ in packets]
    assert 0 in flags and PacketFlag.COMPRESSED in flags
    assert np.array_equal(landed, block.array)  # nothing lost: the pages of every job arrived as they were
