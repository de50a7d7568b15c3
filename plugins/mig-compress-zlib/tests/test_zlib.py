"""The zlib plugin is installed, discovered through its entry point, and round-trips packets."""

import os
import random

import pytest

from mig_core import PluginRegistry
from mig_core.ext.compressor import Compressor
from mig_core.testing.contracts import CompressorContract


def test_discovered_and_selected():
    reg = PluginRegistry()
    cls = reg.load("mig_core.compressors", "zlib")
    assert issubclass(cls, Compressor) and cls.name == "zlib"
    entry = reg.choice("compressors", "zlib")
    assert entry.distribution == "mig-compress-zlib"


@pytest.mark.parametrize("level", [0, 1, 9])
def test_stream_round_trip_per_packet(level):
    comp = PluginRegistry().load("mig_core.compressors", "zlib")()
    enc, dec = comp.encoder(level), comp.decoder()
    packets = [os.urandom(4096), bytes(4096 * 8), (b"mig page " * 1000)[:8192], os.urandom(100)]
    sizes = []
    for p in packets:
        wire = enc.compress(memoryview(p))
        sizes.append(len(wire))
        assert dec.decompress(wire, len(p)) == p  # each packet decodes on arrival
    if level:
        assert sizes[1] < 4096  # zero pages compress


def test_corrupt_packet_is_refused():
    comp = PluginRegistry().load("mig_core.compressors", "zlib")()
    dec = comp.decoder()
    with pytest.raises(ValueError):
        dec.decompress(b"\x00garbage that is not a stream" * 3, 4096)


def test_wrong_size_is_refused():
    comp = PluginRegistry().load("mig_core.compressors", "zlib")()
    enc, dec = comp.encoder(1), comp.decoder()
    with pytest.raises(ValueError):
        dec.decompress(enc.compress(bytes(4096)), 8192)


class TestContract(CompressorContract):
    """mig's compressor contract (mig_core.testing.contracts), as every compressor plugin runs it."""

    name = "zlib"
    distribution = "mig-compress-zlib"
    levels = (0, 1, 9)


def _packet(n: int) -> bytes:
    """``n`` bytes of mixed text and random data (seeded: the same every run): several ``PIECE``s of output, a
    stream of many blocks."""
    rng = random.Random(21)
    words = [rng.randbytes(7).hex().encode() for _ in range(64)]
    text = b" ".join(words[i % 61] for i in range(n // 8))[:n // 2]
    return text + rng.randbytes(n - len(text))


def test_a_packet_of_many_pieces_lands_whole_in_place():
    comp = PluginRegistry().load("mig_core.compressors", "zlib")()
    data = _packet(3 << 20)  # 12 pieces of output, written straight into the target
    wire = comp.encoder(1).compress(memoryview(data))
    target = bytearray(len(data) + 8)
    comp.decoder().decompress_into(wire, memoryview(target)[4:-4])
    assert target[4:-4] == data and target[:4] == bytes(4) and target[-4:] == bytes(4)


@pytest.mark.parametrize("damage", ["checksum", "truncated", "trailing", "body"])
def test_damaged_packets_are_refused(damage):
    """A wrong adler-32, a stream cut short, bytes after its end, a flipped bit inside: ValueError, no
    partial success."""
    comp = PluginRegistry().load("mig_core.compressors", "zlib")()
    data = _packet(1 << 20)
    wire = bytearray(comp.encoder(1).compress(memoryview(data)))
    if damage == "checksum":
        wire[-1] ^= 0xFF
    elif damage == "truncated":
        wire = wire[:len(wire) // 2]
    elif damage == "trailing":
        wire += b"\x00"
    else:
        wire[len(wire) // 3] ^= 0x10
    with pytest.raises(ValueError):
        comp.decoder().decompress_into(bytes(wire), memoryview(bytearray(len(data))))
