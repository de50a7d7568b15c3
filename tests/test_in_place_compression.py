"""Multifd channels compress live RAM in place only where the dirty tracker proves it went unwritten.

A codec reading live RAM in place can rebuild a page nobody wrote from bytes that changed under it (a match
against a page written meanwhile). These tests put a real sender and decoder on a socket pair over a machine
tracked by uffd-wp, and inject that hazard: an encoder whose in-place output is wrong for a page nobody
wrote whenever a page of its input is written during the call. The tracker's proof must catch every such
call, so what lands is exact; with a witness that proves blindly, the same run loses the page.
"""

from __future__ import annotations

import socket
import threading
import uuid

import numpy as np

from mig_core.engine.multifd_send import MultifdSender
from mig_core.engine.stats import MigrationCounters
from mig_core.ext import compressor
from mig_core.ext.channel import SocketChannel
from mig_core.ext.compressor import Encoder
from mig_core.machine.machine import Machine
from mig_core.machine.reference_host import fill
from mig_core.plugin.registry import PluginRegistry
from mig_core.testing.multifd_sink import receive_channel

JOB = 1024  # pages per job (4 MiB): one run, so the channel is given a view of live RAM
JOBS = 4
WRITTEN, VICTIM = 100, 700  # within each job: the page a "vCPU" writes, the page the hazard damages


class _Hazard(Encoder):
    """The real zstd encoder, except that ``compress_parts_stable`` on a job the test marks behaves as an in-place
    codec does when a vCPU writes meanwhile: the page at ``WRITTEN`` changes during the call, and the frame
    rebuilds the page at ``VICTIM`` (not written) wrongly."""

    independent = True

    def __init__(self, inner: Encoder, block, marked: set[int]) -> None:
        self.inner, self.block, self.marked = inner, block, marked
        self.stable_calls = 0

    def compress(self, data):
        return self.inner.compress(data)

    def compress_parts(self, data):
        return self.inner.compress_parts(data)

    def compress_parts_stable(self, data):
        self.stable_calls += 1
        view = np.frombuffer(data, dtype=np.uint8)
        if view.nbytes != JOB * 4096:
            return self.inner.compress_parts_stable(data)
        first = (view.ctypes.data - self.block.read_pages.ctypes.data) // 4096
        if first // JOB not in self.marked:
            return self.inner.compress_parts_stable(data)
        self.block.pages[first + WRITTEN, :8] += 1  # the vCPU's write, through the tracked mapping
        damaged = view.copy()
        damaged[VICTIM * 4096:(VICTIM + 1) * 4096] ^= 0x5A  # what a match against the old bytes rebuilds
        return [bytes(b) for b in self.inner.compress_parts_stable(damaged.data)]


class _BlindWitness:
    """A witness that proves every range unwritten: what the sender would do without the tracker's proof."""

    def write_epoch(self) -> int:
        return 0

    def unwritten_since(self, epoch, block, first, npages) -> bool:
        return True


def _send_jobs(witness: str, marked: set[int], written_first: set[int] = frozenset()):
    """Send JOBS jobs of text-like pages over one compressing channel; returns (landed, block, sender, encoder)."""
    m = Machine()
    m.add_ram("pc.ram", JOBS * JOB * 4096)
    fill(m, "text")
    block = m.blocks[0]
    # named, not auto-selected: where uffd-wp cannot serve, this fails saying why rather than testing another
    tracker = PluginRegistry.from_environment().load("mig_core.dirty_trackers", "uffd-wp")(m.blocks)
    consumer = tracker.consumer("migration", sends=True)
    consumer.collect()  # the pass's harvest: every page armed from here on
    for j in written_first:  # written after the harvest and before the channel gets the job
        block.pages[j * JOB + 3, 0] += 1
    comp = compressor.load(PluginRegistry.from_environment(), "zstd", 4096)
    encoder = _Hazard(comp.encoder(1), block, marked)
    a, b = socket.socketpair()
    sender = MultifdSender([SocketChannel(a)], str(uuid.uuid4()), MigrationCounters(), lambda: encoder,
                           detect_zero=True, zero_copy=False)
    sender.witness = _BlindWitness() if witness == "blind" else tracker  # type: ignore[assignment]
    landed = np.zeros_like(block.array)
    receiver = threading.Thread(target=receive_channel, args=(b, comp.decoder(), block.npages, landed))
    receiver.start()
    try:
        sender.start()
        for j in range(JOBS):
            sender.send(0, block, np.arange(j * JOB, (j + 1) * JOB), None, 1, lambda: None)
        sender.sync(1, lambda: None)
        sender.finish()
        receiver.join(30)
        assert not receiver.is_alive()
    finally:
        sender.close()
        b.close()
        written_since = consumer.collect().pages["pc.ram"]
        consumer.close()
        tracker.close()
    return landed, block, sender, encoder, written_since


def test_unwritten_live_pages_are_compressed_in_place():
    """Nothing writes: every packet of live RAM is compressed in place and kept, and lands exact."""
    landed, block, sender, encoder, written = _send_jobs("uffd-wp", marked=set())
    assert np.array_equal(landed, block.array)
    assert (sender.in_place.kept, sender.in_place.redone, sender.in_place.copied) == (JOBS, 0, 0)
    assert len(written) == 0


def test_a_page_written_during_the_call_sends_the_packet_from_a_copy():
    """The hazard strikes jobs 1 and 3: the tracker sees the write, the sender drops the damaged frame and
    compresses the job again from a copy, so the victim page lands as it is and the written page is dirty."""
    landed, block, sender, encoder, written = _send_jobs("uffd-wp", marked={1, 3})
    assert (sender.in_place.kept, sender.in_place.redone, sender.in_place.copied) == (2, 2, 0)
    assert np.array_equal(landed, block.array)  # the victims exact; the written pages as they are now
    assert list(written) == [1 * JOB + WRITTEN, 3 * JOB + WRITTEN]  # dirty: the next pass sends them again


def test_pages_written_before_the_call_send_the_packet_from_a_copy_at_once():
    """A job with a page written since the harvest goes to the copying path without an in-place attempt
    (it could not be proved afterwards either)."""
    landed, block, sender, encoder, written = _send_jobs("uffd-wp", marked=set(), written_first={2})
    assert (sender.in_place.kept, sender.in_place.redone, sender.in_place.copied) == (JOBS - 1, 0, 1)
    assert np.array_equal(landed, block.array)
    assert list(written) == [2 * JOB + 3]


def test_without_the_proof_the_hazard_loses_a_page_nobody_wrote():
    """The same run with a witness that proves blindly keeps the damaged frames: the victims, never written
    and so never sent again, land wrong. This is what the tracker's proof prevents (the test above)."""
    landed, block, sender, encoder, written = _send_jobs("blind", marked={1, 3})
    assert sender.in_place.redone == 0
    got, want = landed.reshape(-1, 4096), block.array.reshape(-1, 4096)
    bad = np.flatnonzero((got != want).any(axis=1))
    assert list(bad) == [1 * JOB + VICTIM, 3 * JOB + VICTIM]
    assert not np.isin(bad, written).any()  # no dirty bit would ever resend them
