"""Contract tests for plugin authors: subclass one in your plugin's tests and your plugin gets mig's checks.

Each class is a pytest test class whose name does not start with ``Test``, so pytest collects only your
subclass (``class TestMyCompressor(CompressorContract): name = "lz4"; distribution = "acme-lz4"``). Every
first-party plugin's tests subclass these, so a third-party plugin is held to the same rules.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from mig_core.errors import ChannelAborted, ChannelEOF
from mig_core.ext import compressor as compressor_ext
from mig_core.ext import dirty_tracker as tracker_ext
from mig_core.ext import snapshot_backend as snapshot_ext
from mig_core.ext import transport as transport_ext
from mig_core.ext.channel import Channel
from mig_core.ext.compressor import Compressor
from mig_core.ext.dirty_tracker import DirtyConsumer, DirtyTracker
from mig_core.ext.snapshot_backend import SnapshotBackend
from mig_core.ext.transport import Listener, Transport, TransportContext
from mig_core.memory.ram import Backing, RAMBlock, allocate
from mig_core.plugin.registry import PluginRegistry
from mig_core.schema.migration import MigrationAddress
from mig_core.schema.parameters import SPECS

__all__ = ["CompressorContract", "DirtyTrackerContract", "SnapshotBackendContract", "TransportContract"]


def _served_by(group: str, name: str, distribution: str | None) -> None:
    entry = PluginRegistry().choice(group, name)
    assert entry is not None, f"nothing serves '{name}' in {group}: is the distribution installed?"
    if distribution is not None:
        assert entry.distribution == distribution


# ---------------------------------------------------------------------------
# compressors


class CompressorContract:
    """A compressor plugin: found by name, each packet decodes on arrival, channels independent,
    damaged or mis-sized packets refused with ``ValueError``."""

    #: The entry-point name in ``mig_core.compressors`` (a multifd-compression value).
    name: ClassVar[str]
    #: The distribution expected to serve it (None: do not check).
    distribution: ClassVar[str | None] = None
    #: Levels to exercise (the plugin's level parameter's range ends and a middle).
    levels: ClassVar[tuple[int, ...]] = (1,)
    page_size: ClassVar[int] = 4096

    def compressor(self) -> Compressor:
        return compressor_ext.load(PluginRegistry(), self.name, self.page_size)

    def packets(self) -> list[bytes]:
        ps, rng = self.page_size, np.random.default_rng(7)
        text = (b"mig compresses pages of a running program. " * (ps // 8))[: 2 * ps]
        return [rng.integers(0, 256, ps, dtype=np.uint8).tobytes(), bytes(8 * ps), text,
                rng.integers(0, 4, 16 * ps, dtype=np.uint8).tobytes()]

    def test_served_by_its_distribution(self) -> None:
        _served_by(compressor_ext.GROUP, self.name, self.distribution)
        comp = self.compressor()
        assert isinstance(comp, Compressor) and type(comp).name == self.name
        if comp.level_parameter is not None:
            assert comp.level_parameter in SPECS, f"level parameter {comp.level_parameter} is not a parameter"

    def test_each_packet_decodes_on_arrival(self) -> None:
        comp = self.compressor()
        for level in self.levels:
            enc, dec = comp.encoder(level), comp.decoder()
            for p in self.packets():
                wire = enc.compress(memoryview(p))
                assert dec.decompress(wire, len(p)) == p, f"level {level}: a packet did not round-trip"

    def test_in_place_packets_decode_between_copied_ones(self) -> None:
        """``compress_parts_stable`` (data nothing writes, compressed in place) makes packets the same decoder
        reads, on the same encoder and in any order with ``compress_parts``'s."""
        comp = self.compressor()
        for level in self.levels:
            enc, dec = comp.encoder(level), comp.decoder()
            for i, p in enumerate(self.packets() * 2):
                parts = (enc.compress_parts_stable if i % 3 else enc.compress_parts)(memoryview(p))
                wire = b"".join(bytes(x) for x in parts)
                assert dec.decompress(wire, len(p)) == p, f"level {level}: packet {i} did not round-trip"

    def test_channels_are_independent(self) -> None:
        """Each multifd channel has its own encoder and decoder; interleaving them changes nothing."""
        comp = self.compressor()
        pairs = [(comp.encoder(self.levels[0]), comp.decoder()) for _ in range(2)]
        for p in self.packets():
            for enc, dec in pairs:
                assert dec.decompress(enc.compress(memoryview(p)), len(p)) == p

    def test_decodes_into_the_buffer_given(self) -> None:
        """``decompress_into`` fills exactly the view it is given (the pages' own memory) or refuses."""
        comp = self.compressor()
        enc, dec = comp.encoder(self.levels[0]), comp.decoder()
        for p in self.packets():
            wire = b"".join(bytes(b) for b in enc.compress_parts(memoryview(p)))
            ram = bytearray(b"\xaa" * (len(p) + 2))
            dec.decompress_into(wire, memoryview(ram)[1:1 + len(p)])
            assert ram[1:1 + len(p)] == p and ram[0] == ram[-1] == 0xAA, "decompress_into wrote outside its view"
            with pytest.raises(ValueError):
                comp.decoder().decompress_into(wire, memoryview(bytearray(len(p) + self.page_size)))

    def test_independent_packets_decode_alone(self) -> None:
        """An encoder that declares ``independent``: any packet decodes with a fresh decoder, in any order
        (the sender may send a packet's pages as they are instead, and the decoder never sees it)."""
        comp = self.compressor()
        enc = comp.encoder(self.levels[0])
        if not enc.independent:
            pytest.skip("packets of this method depend on the ones before")
        packets = self.packets()
        wires = [b"".join(bytes(b) for b in enc.compress_parts(memoryview(p))) for p in packets]
        for p, wire in reversed(list(zip(packets, wires, strict=True))):
            assert comp.decoder().decompress(wire, len(p)) == p

    #: Packets compressed while another thread writes to them (``test_pages_written_meanwhile...``).
    live_rounds: ClassVar[int] = 300

    def test_pages_written_meanwhile_leave_the_others_intact(self) -> None:
        """A packet may be compressed from live RAM that a vCPU writes meanwhile: a page written may arrive
        old or new, every other page must arrive as it is. An encoder reads each byte once (from a copy, its
        own or its codec's); one that matches against the caller's buffer in place rebuilds unwritten pages
        from bytes that changed after it emitted them (zstd's one-shot call did).

        Pages of one repeated text, so the codec matches across pages; a thread flips the first word of
        every even page between its text and a counter. Only odd pages and the rest of even pages are checked:
        this cannot fail for an encoder that reads each byte once; zstd's in-place call failed it in the
        first round of 5 runs of 5 (with one core the writer runs less often, and it may pass)."""
        ps, n = self.page_size, 64
        base = np.frombuffer(b"mig moves the state of running programs between hosts. ", np.uint8)
        ram = np.tile(np.resize(base, ps), n)
        pristine = ram.reshape(n, ps).copy()
        words = ram.view(np.uint64).reshape(n, -1)
        even = np.arange(0, n, 2)
        text_word = words[even, 0].copy()
        stop = threading.Event()

        def vcpu() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                words[even, 0] = text_word if i % 2 else i

        comp = self.compressor()
        enc, dec = comp.encoder(self.levels[-1]), comp.decoder()
        writer = threading.Thread(target=vcpu, daemon=True)
        writer.start()
        try:
            for r in range(self.live_rounds):
                wire = b"".join(bytes(b) for b in enc.compress_parts(ram.data))
                got = np.frombuffer(dec.decompress(wire, ram.nbytes), np.uint8).reshape(n, ps)
                assert (got[1::2] == pristine[1::2]).all(), f"round {r}: a page nobody wrote arrived changed"
                assert (got[::2, 8:] == pristine[::2, 8:]).all(), f"round {r}: bytes nobody wrote arrived changed"
        finally:
            stop.set()
            writer.join()

    def test_damaged_packet_is_refused(self) -> None:
        comp = self.compressor()
        with pytest.raises(ValueError):
            comp.decoder().decompress(b"\x00 not a packet of this method \xff" * 5, self.page_size)

    def test_wrong_size_is_refused(self) -> None:
        comp = self.compressor()
        enc, dec = comp.encoder(self.levels[0]), comp.decoder()
        with pytest.raises(ValueError):
            dec.decompress(enc.compress(memoryview(bytes(self.page_size))), 2 * self.page_size)


# ---------------------------------------------------------------------------
# transports


class TransportContract:
    """A transport plugin: found by address type, bytes cross in order, a return path where declared,
    and ``abort`` unblocks a receive that waits for a peer."""

    #: The entry-point name in ``mig_core.transports`` (a MigrationAddressType value).
    name: ClassVar[str]
    distribution: ClassVar[str | None] = None
    #: False for a transport whose source must finish before the destination can open (a file).
    live_peer: ClassVar[bool] = True

    def source_address(self, tmp_path: Path) -> MigrationAddress:
        """Where the source connects for one local round trip."""
        raise NotImplementedError

    def destination_address(self, tmp_path: Path) -> MigrationAddress:
        """Where the destination listens for the same round trip (the same address for most transports)."""
        return self.source_address(tmp_path)

    def connect_address(self, tmp_path: Path, listener: Listener) -> MigrationAddress:
        """Where the source connects once the destination listens (override to use the port it was given)."""
        return self.source_address(tmp_path)

    def transport(self) -> Transport:
        return transport_ext.load(PluginRegistry(), self.name)(TransportContext())

    def _pair(self, tmp_path: Path, payload: bytes, finish: bool = True) -> tuple[Channel, _Source]:
        """The destination's channel once the source connected and began sending ``payload`` (then
        finished, if ``finish``); the source runs in a thread (``_Source``) when the peer is live."""
        src_t, dst_t = self.transport(), self.transport()
        if not self.live_peer:  # the source writes everything first, then the destination opens it
            source = _Source(src_t, self.source_address(tmp_path), payload, finish)
            source.run()
            source.check()
            for s in source.channels:
                s.close()
            listener = dst_t.listen(self.destination_address(tmp_path))
            try:
                return listener.accept(), source
            finally:
                listener.close()
        listener = dst_t.listen(self.destination_address(tmp_path))
        source = _Source(src_t, self.connect_address(tmp_path, listener), payload, finish)
        source.start()
        try:
            return listener.accept(), source
        finally:
            listener.close()

    def test_served_by_its_distribution(self) -> None:
        _served_by(transport_ext.GROUP, self.name, self.distribution)
        assert type(self.transport()).address_type == self.name

    def test_bytes_cross_in_order(self, tmp_path: Path) -> None:
        payload = os.urandom(3 << 20)
        ch, source = self._pair(tmp_path, payload)
        try:
            assert ch.recv_exact(len(payload)) == payload
            source.check()
        finally:
            ch.close()
            source.close()

    def test_return_path_where_declared(self, tmp_path: Path) -> None:
        cls = type(self.transport())
        if not (cls.abilities.return_path and self.live_peer):
            pytest.skip(f"{self.name} declares no return path")
        ch, source = self._pair(tmp_path, b"ping", finish=False)
        try:
            assert ch.recv_exact(4) == b"ping"
            source.check()
            ch.send(b"pong")
            assert source.channels[0].recv_exact(4) == b"pong"
        finally:
            ch.close()
            source.close()

    def test_what_is_sent_before_close_arrives(self, tmp_path: Path) -> None:
        """A side that sends its last words and closes at once (a destination after its verdict) loses none
        of them: the peer reads every byte, then the end of the stream."""
        cls = type(self.transport())
        if not (cls.abilities.return_path and self.live_peer):
            pytest.skip(f"{self.name} declares no return path")
        ch, source = self._pair(tmp_path, b"ping", finish=False)
        words = [os.urandom(1024) for _ in range(16)]  # small enough for any socket buffer: nobody reads yet
        try:
            assert ch.recv_exact(4) == b"ping"
            source.check()
            for w in words:
                ch.send(w)
            ch.close()
            back = source.channels[0]
            assert back.recv_exact(len(words) * 1024) == b"".join(words)
            with pytest.raises(ChannelEOF):
                back.recv_exact(1)
        finally:
            ch.close()
            source.close()

    def test_abort_unblocks_a_waiting_receive(self, tmp_path: Path) -> None:
        if not self.live_peer:
            pytest.skip(f"{self.name} has no live peer to wait for")
        # one byte first (some transports see a peer only once it sends), then silence: a receive waits
        ch, source = self._pair(tmp_path, b"x", finish=False)
        outcome: list[BaseException] = []

        def receive() -> None:
            try:
                ch.recv_exact(1)
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                outcome.append(e)

        try:
            assert ch.recv_exact(1) == b"x"
            source.check()
            t = threading.Thread(target=receive, daemon=True)
            t.start()
            ch.abort("contract test")
            t.join(30)
            assert not t.is_alive(), "abort did not unblock the receive"
            assert outcome and isinstance(outcome[0], ChannelAborted), outcome
        finally:
            ch.close()
            source.close()


class _Source:
    """The sending end of a transport round trip, run in a thread when the destination is live."""

    def __init__(self, transport: Transport, addr: MigrationAddress, payload: bytes, finish: bool) -> None:
        self.transport, self.addr, self.payload, self.finish = transport, addr, payload, finish
        self.channels: list[Channel] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, name="contract-source", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        try:
            ch = self.transport.connect(self.addr, lambda: False)
            self.channels.append(ch)
            ch.send(self.payload)
            if self.finish:
                ch.finish()
        except BaseException as e:  # noqa: BLE001 - check() reports it
            self.errors.append(e)

    def check(self) -> None:
        """Wait for the sender to be done; its error, if it had one."""
        if self.thread.ident is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), "the source is still sending"
        assert not self.errors, self.errors

    def close(self) -> None:
        for ch in self.channels:
            ch.abort("contract test ended")
            ch.close()
        if self.thread.ident is not None:
            self.thread.join(30)


# ---------------------------------------------------------------------------
# dirty trackers


class DirtyTrackerContract:
    """A dirty tracker: the first collect reports exactly the populated pages, every write is reported to
    every consumer (a copy built from reports equals memory), consumers never steal each other's pages."""

    #: The entry-point name in ``mig_core.dirty_trackers``.
    name: ClassVar[str]
    distribution: ClassVar[str | None] = None

    def blocks(self) -> list[RAMBlock]:
        a = allocate("ram0", 4 << 20, backing=Backing.MEMFD)  # exact populated pages (no huge pages)
        b = allocate("ram1", 2 << 20, backing=Backing.ANONYMOUS)
        a.pages[:16] = 3  # state from before tracking starts
        return [a, b]

    def tracker(self, blocks: list[RAMBlock]) -> DirtyTracker:
        cls = tracker_ext.load(PluginRegistry(), self.name)
        why = cls.unavailable(blocks, self.marks_writes(cls))
        if why:
            pytest.skip(f"{self.name} cannot run here: {why}")
        return cls(blocks)

    @staticmethod
    def marks_writes(cls: type[DirtyTracker]) -> bool:
        return hasattr(cls, "mark_dirty")

    def write(self, tracker: DirtyTracker, block: RAMBlock, page: int, value: int) -> None:
        """Write one byte of ``page`` as a program would (and report it where the tracker needs that)."""
        block.pages[page, 7] = value
        mark = getattr(tracker, "mark_dirty", None)
        if mark is not None:
            mark(block.name, page * block.page_size + 7, 1)

    @staticmethod
    def round(consumer: DirtyConsumer, blocks: list[RAMBlock], copy: dict[str, np.ndarray]) -> int:
        report = consumer.collect()
        for b in blocks:
            idx = report.pages[b.name]
            data = b.pages[idx]
            copy[b.name][idx] = data
            consumer.sent(b, idx, data)
        return report.total

    def test_served_by_its_distribution(self) -> None:
        _served_by(tracker_ext.GROUP, self.name, self.distribution)
        assert tracker_ext.load(PluginRegistry(), self.name).name == self.name

    def test_first_collect_reports_the_populated_pages(self) -> None:
        blocks = self.blocks()
        t = self.tracker(blocks)
        try:
            r = t.consumer("c", sends=True).collect()
            assert list(r.pages["ram0"]) == list(range(16))
            assert len(r.pages["ram1"]) == 0
        finally:
            t.close()
            for b in blocks:
                b.close()

    def test_every_write_reaches_every_consumer(self) -> None:
        blocks = self.blocks()
        t = self.tracker(blocks)
        try:
            copies = [{b.name: np.zeros_like(b.pages) for b in blocks} for _ in range(2)]
            migration, rate = t.consumer("migration", sends=True), t.consumer("dirty-rate")
            rng = np.random.default_rng(3)
            for i in range(6):
                for _ in range(40):
                    b = blocks[int(rng.integers(len(blocks)))]
                    self.write(t, b, int(rng.integers(b.npages)), int(rng.integers(1, 255)))
                self.round(migration, blocks, copies[0])
                if i % 2:  # the second consumer at its own pace never loses the first one's pages
                    self.round(rate, blocks, copies[1])
            self.round(rate, blocks, copies[1])
            for copy in copies:
                assert all(np.array_equal(copy[b.name], b.pages) for b in blocks)
            if t.exact:
                assert self.round(migration, blocks, copies[0]) == 0  # nothing written since, nothing reported
        finally:
            t.close()
            for b in blocks:
                b.close()


# ---------------------------------------------------------------------------
# snapshot backends


class SnapshotBackendContract:
    """A snapshot backend: tags round-trip byte-exact (several blocks, zero and repeated pages, device
    state), survive a reopen, an abandoned or interrupted save leaves nothing and harms no earlier tag,
    delete removes one tag only, bad options and a second user of the same storage are refused."""

    #: The entry-point name in ``mig_core.snapshot_backends``.
    name: ClassVar[str]
    #: The distribution expected to serve it (None: do not check).
    distribution: ClassVar[str | None] = None

    def backend(self, tmp_path: Path) -> SnapshotBackend:
        cls = snapshot_ext.load(PluginRegistry(), self.name)
        return cls("node0", {"dir": str(tmp_path / "store")})

    @staticmethod
    def machine(seed: int) -> list[RAMBlock]:
        """Two blocks: random pages, zero pages and pages repeated within and across blocks."""
        rng = np.random.default_rng(seed)
        blocks = [allocate("ram0", 4 << 20), allocate("ram1", 1 << 20)]
        for b in blocks:
            pages = b.pages
            pages[: b.npages // 2] = rng.integers(0, 256, (b.npages // 2, b.page_size), dtype=np.uint8)
            pages[b.npages // 2: b.npages // 2 + 8] = 7  # eight identical pages
        return blocks

    def _save(self, backend: SnapshotBackend, tag: str, blocks: list[RAMBlock], vmstate: bytes) -> None:
        from mig_core.engine.snapshot.ram import save_ram
        from mig_core.machine.machine import Machine

        m = Machine()
        m.blocks.extend(blocks)
        writer = backend.begin(tag, [snapshot_ext.BlockShape(b.name, b.size, b.page_size) for b in blocks])
        save_ram(m, writer, 3, lambda: None, lambda done, total: None)
        writer.put_vmstate(vmstate)
        info = writer.commit()
        assert info.tag == tag and info.ram_size == sum(b.size for b in blocks)

    def _load(self, backend: SnapshotBackend, tag: str, seed: int) -> tuple[list[RAMBlock], bytes]:
        from mig_core.engine.snapshot.ram import load_ram
        from mig_core.machine.machine import Machine

        blocks = self.machine(seed)  # other contents first: the load must replace every page
        m = Machine()
        m.blocks.extend(blocks)
        reader = backend.open(tag)
        try:
            load_ram(m, reader, 3, lambda: None, lambda done, total: None)
            return blocks, reader.vmstate()
        finally:
            reader.close()

    def test_served_by_its_distribution(self) -> None:
        _served_by(snapshot_ext.GROUP, self.name, self.distribution)

    def test_round_trip_survives_a_reopen(self, tmp_path: Path) -> None:
        blocks = self.machine(1)
        backend = self.backend(tmp_path)
        self._save(backend, "first", blocks, b"device state")
        backend.close()
        backend = self.backend(tmp_path)  # a new process would see the same
        [info] = backend.list()
        nonzero = sum(int(b.pages.any(axis=1).sum()) * b.page_size for b in blocks)
        assert (info.tag, info.vm_state_size) == ("first", nonzero + len(b"device state"))
        loaded, vmstate = self._load(backend, "first", 2)
        assert vmstate == b"device state"
        for a, b in zip(blocks, loaded, strict=True):
            assert bytes(a.view) == bytes(b.view)
        backend.close()

    def test_abandoned_and_interrupted_saves_leave_nothing(self, tmp_path: Path) -> None:
        backend = self.backend(tmp_path)
        self._save(backend, "kept", self.machine(1), b"k")
        writer = backend.begin("gone", [snapshot_ext.BlockShape("ram0", 4 << 20, 4096)])
        blocks = self.machine(3)
        writer.put_pages(snapshot_ext.BlockShape("ram0", 4 << 20, 4096), np.arange(16), blocks[0].pages[:16])
        writer.abandon()
        assert not backend.exists("gone")
        writer = backend.begin("cut", [snapshot_ext.BlockShape("ram0", 4 << 20, 4096)])
        writer.put_pages(snapshot_ext.BlockShape("ram0", 4 << 20, 4096), np.arange(64), blocks[0].pages[:64])
        backend.close()  # the process died here: no commit, no abandon
        backend = self.backend(tmp_path)
        assert [s.tag for s in backend.list()] == ["kept"]
        loaded, vmstate = self._load(backend, "kept", 4)
        assert vmstate == b"k" and bytes(loaded[0].view) == bytes(self.machine(1)[0].view)
        backend.close()

    def test_delete_removes_one_tag(self, tmp_path: Path) -> None:
        backend = self.backend(tmp_path)
        self._save(backend, "a", self.machine(1), b"a")
        self._save(backend, "b", self.machine(5), b"b")
        backend.delete("a")
        assert [s.tag for s in backend.list()] == ["b"] and not backend.exists("a")
        with pytest.raises(KeyError):
            backend.open("a")
        with pytest.raises(KeyError):
            backend.delete("a")
        loaded, _ = self._load(backend, "b", 6)
        assert bytes(loaded[0].view) == bytes(self.machine(5)[0].view)
        backend.close()

    def test_bad_options_and_a_second_user_are_refused(self, tmp_path: Path) -> None:
        cls = snapshot_ext.load(PluginRegistry(), self.name)
        with pytest.raises(ValueError, match="'bogus'"):
            cls("n", {"dir": str(tmp_path), "bogus": "1"})
        with pytest.raises(ValueError, match="'dir'"):
            cls("n", {})
        first = self.backend(tmp_path)
        with pytest.raises(ValueError, match="in use by another process"):
            self.backend(tmp_path)
        first.close()
        self.backend(tmp_path).close()
