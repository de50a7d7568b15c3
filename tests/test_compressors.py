"""Every installed compressor: compress_parts (what channels send) carries the same bytes as compress."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mig_core.plugin.registry import PluginRegistry
from mig_core.testing.contracts import CompressorContract

#: the first-party compressors (every one is installed by `make test`)
NAMES = ["qpl", "uadk", "zlib", "zstd"]


def packets() -> list[np.ndarray]:
    """Three 1 MiB packets: random (pages travel raw in per-page formats), text-like, and runs of
    random and text pages of varying lengths (raw runs and compressed runs alternate)."""
    rng = np.random.default_rng(7)
    text = np.frombuffer((b"mig migrates memory; " * 60000)[:1 << 20], dtype=np.uint8).copy()
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    mixed = text.copy().reshape(-1, 4096)
    for first, n in ((0, 1), (3, 2), (9, 5), (40, 1), (41, 3), (255, 1)):  # random pages, incl. the last
        mixed[first:first + n] = noise.reshape(-1, 4096)[first:first + n]
    return [noise, text, mixed.reshape(-1)]


@pytest.mark.parametrize("name", NAMES)
def test_parts_equal_the_joined_packet_and_decode_from_a_reused_buffer(name):
    comp = PluginRegistry.from_environment().load("mig_core.compressors", name)()
    level = 1
    whole, split, dec = comp.encoder(level), comp.encoder(level), comp.decoder()
    wire = bytearray(2 << 20)  # one receive buffer for every packet, as a multifd channel keeps it
    for data in packets():
        expected = whole.compress(memoryview(data))
        parts = split.compress_parts(memoryview(data))
        sent = b"".join(parts)
        assert sent == expected
        view = memoryview(wire)[:len(sent)]
        view[:] = sent
        out = dec.decompress(view, len(data))
        wire[:len(sent)] = bytes(len(sent))  # overwritten before the result is compared: nothing may alias it
        assert out == data.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_pages_written_while_compressed_still_decode(name):
    """A vCPU may write a page while a channel compresses it: every packet must still decode (uadk's
    zlib format checks each page against a checksum the codec computes in a second read)."""
    comp = PluginRegistry.from_environment().load("mig_core.compressors", name)()
    ram = packets()[1]
    words = ram.view(np.uint64)
    stop = threading.Event()

    def vcpu() -> None:
        while not stop.is_set():
            words[::7] += 1  # numpy drops the GIL for the loop: it really runs beside the encoder

    writer = threading.Thread(target=vcpu)
    writer.start()
    try:
        enc, dec = comp.encoder(1), comp.decoder()
        for _ in range(20):
            out = dec.decompress(b"".join(enc.compress_parts(memoryview(ram))), len(ram))
            assert len(out) == len(ram)
    finally:
        stop.set()
        writer.join()


class TestNoneContract(CompressorContract):
    """The built-in ``none`` method runs the contract every compressor plugin runs."""

    name = "none"
    distribution = "mig-core"
