"""The zstd plugin is installed, discovered through its entry point, and round-trips packets."""

import os

import pytest

from mig_core import PluginRegistry
from mig_core.ext.compressor import Compressor
from mig_core.testing.contracts import CompressorContract


def test_discovered_and_selected():
    reg = PluginRegistry()
    cls = reg.load("mig_core.compressors", "zstd")
    assert issubclass(cls, Compressor) and cls.name == "zstd"
    entry = reg.choice("compressors", "zstd")
    assert entry.distribution == "mig-compress-zstd"


@pytest.mark.parametrize("level", [0, 1, 9])
def test_stream_round_trip_per_packet(level):
    comp = PluginRegistry().load("mig_core.compressors", "zstd")()
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
    comp = PluginRegistry().load("mig_core.compressors", "zstd")()
    dec = comp.decoder()
    with pytest.raises(ValueError):
        dec.decompress(b"\x00garbage that is not a stream" * 3, 4096)


def test_wrong_size_is_refused():
    comp = PluginRegistry().load("mig_core.compressors", "zstd")()
    enc, dec = comp.encoder(1), comp.decoder()
    with pytest.raises(ValueError):
        dec.decompress(enc.compress(bytes(4096)), 8192)


class TestContract(CompressorContract):
    """mig's compressor contract (mig_core.testing.contracts), as every compressor plugin runs it."""

    name = "zstd"
    distribution = "mig-compress-zstd"
    levels = (0, 1, 20)
