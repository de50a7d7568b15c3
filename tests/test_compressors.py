"""Every installed compressor: compress_parts (what channels send) carries the same bytes as compress."""

from __future__ import annotations

import numpy as np
import pytest

from mig_core.plugin_registry import PluginRegistry

REGISTRY = PluginRegistry.from_environment()
NAMES = [n for n in REGISTRY.names("mig_core.compressors") if n != "none"]


def packets() -> list[np.ndarray]:
    """Three 1 MiB packets: random (pages travel raw in per-page formats), text-like, and mixed."""
    rng = np.random.default_rng(7)
    text = np.frombuffer((b"mig migrates memory; " * 60000)[:1 << 20], dtype=np.uint8).copy()
    mixed = text.copy()
    mixed[::3] = rng.integers(0, 256, len(mixed[::3]), dtype=np.uint8)
    return [rng.integers(0, 256, 1 << 20, dtype=np.uint8), text, mixed]


@pytest.mark.parametrize("name", NAMES)
def test_parts_equal_the_joined_packet_and_decode_from_a_reused_buffer(name):
    comp = REGISTRY.load("mig_core.compressors", name)()
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
