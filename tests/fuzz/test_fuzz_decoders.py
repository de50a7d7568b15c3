"""Fuzzing every decoder that reads what a peer or a client sends (issue 18, item 4).

Each target takes bytes (or a JSON value) from hypothesis and must either accept them or refuse them
with its documented error; any other exception is a crash, and an example that runs longer than
``HANG_SECONDS`` is a hang. Inputs are both raw garbage and mutations of valid encodings (a flipped
bit, a cut, an insertion), which reach far deeper than random bytes do.

``make test`` runs a bounded number of examples per target; ``make fuzz`` sets ``MIG_FUZZ_EXAMPLES``
(100 000 by default there). A crash found becomes a regression test in the module of its decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mig_core.block.bitmap import DirtyBitmap, granularity_error
from mig_core.block.node import BlockNode
from mig_core.engine import dirty_bitmaps
from mig_core.engine.held_pages import decode_runs, encode_runs
from mig_core.errors import ChannelError, QMPError, StreamError
from mig_core.ext.memory_channel import loopback_pair
from mig_core.machine.block_data import BlockDataDevice
from mig_core.machine.device import Device, DeviceRegistry, DeviceSection, DeviceStateError
from mig_core.machine.machine import Machine
from mig_core.memory import xbzrle
from mig_core.memory.ram import allocate
from mig_core.qapi.visitor import QapiInputError
from mig_core.qmp.dispatch import check_request, visit_arguments
from mig_core.qmp.framing import JsonInputError, JsonStreamer
from mig_core.schema.commands import COMMANDS
from mig_core.stream import mapped_ram
from mig_core.stream import postcopy as postcopy_wire
from mig_core.stream.format import META_HEADER
from mig_core.stream.multifd import PACKET, PACKET_MAGIC, pack_header, read_packet
from mig_core.stream.placement import CopyPlacer
from mig_core.stream.reader import StreamReader
from mig_core.stream.writer import StreamWriter

T = TypeVar("T")
EXAMPLES = int(os.environ.get("MIG_FUZZ_EXAMPLES", "300"))
HANG_SECONDS = 10
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: examples run per target (``make fuzz`` prints them: the count behind "N cases, 0 crashes")
CASES: Counter[str] = Counter()


@pytest.fixture(autouse=True, scope="module")
def _report_cases() -> Iterator[None]:
    yield
    if os.environ.get("MIG_FUZZ_REPORT"):
        print("\nfuzz cases per target:")
        for name, n in sorted(CASES.items()):
            print(f"  {name}: {n}")


@contextmanager
def no_hang(target: str) -> Iterator[None]:
    """Fail the example if it runs longer than HANG_SECONDS (SIGALRM: the main thread, as pytest runs)."""
    CASES[target] += 1
    def alarm(signum: int, frame: object) -> None:
        raise AssertionError(f"hang: the decoder ran over {HANG_SECONDS} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few flips, cuts, insertions or overwrites; or, now and then, plain garbage."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=4096))
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
    return bytes(data)


# -- the main stream ------------------------------------------------------------------------------

UUID = "12345678-1234-5678-1234-567812345678"


class _Serial(Device):
    id = "serial"
    version = 2
    state_type = dict[str, list[int]]

    def save_state(self) -> dict[str, list[int]]:
        return {"regs": [1, 2, 3]}

    def load_state(self, state: dict[str, list[int]], version: int) -> None:
        self.regs = state["regs"]


def _blocks() -> list:
    return [allocate("ram0", 16 * 4096), allocate("ram1", 4 * 8192, page_size=8192)]


def _blocks_filled() -> list:
    """The source's blocks: the first one random, the second zero."""
    src = _blocks()
    src[0].pages[:] = np.random.default_rng(1).integers(0, 255, src[0].pages.shape, dtype=np.uint8)
    return src


def _valid_stream(checksums: bool = False) -> bytes:
    src = _blocks_filled()
    tx, rx = loopback_pair(capacity=16 << 20)
    w = StreamWriter(tx, src, checksums=checksums)
    w.write_header(UUID)
    w.write_pages(src[0], np.arange(16))
    w.write_zero_pages(src[1], np.array([0, 3]))
    w.write_device(DeviceSection("serial", 0, 2, msgpack.packb({"regs": [1, 2, 3]})))
    w.write_pass(1)
    w.write_end()
    tx.close()
    out, buf = bytearray(), bytearray(65536)
    while n := rx._recv_into(memoryview(buf)):
        out += buf[:n]
    return bytes(out)


STREAM = _valid_stream()


def _reader_of(data: bytes) -> tuple[list, StreamReader]:
    """Fresh destination blocks and a reader of ``data`` (the whole stream, then its end)."""
    dst = _blocks()
    tx, rx = loopback_pair(capacity=len(data) + 1)
    tx.send(data)
    tx.close()
    return dst, StreamReader(rx, dst, CopyPlacer(dst))


@FUZZ
@given(data=mutated(STREAM))
def test_stream_reader(data: bytes) -> None:
    dst, reader = _reader_of(data)
    with no_hang("stream_reader"):
        try:
            reader.read_header()
            for _ in reader:
                pass
        except (StreamError, ChannelError):
            pass
    assert [b.pages.shape for b in dst] == [(16, 4096), (4, 8192)]


CHECKED_STREAM = _valid_stream(checksums=True)


@FUZZ
@given(bit=st.integers(0, len(CHECKED_STREAM) * 8 - 1))
def test_a_checksummed_stream_never_accepts_a_flipped_bit(bit: int) -> None:
    """x-checksums: whatever bit is flipped (framing, page data, a checksum), the read fails or ends with
    pages still suspect, which the destination refuses to run on: no wrong data is ever accepted."""
    data = bytearray(CHECKED_STREAM)
    data[bit // 8] ^= 1 << (bit % 8)
    _dst, reader = _reader_of(bytes(data))
    with no_hang("checksummed_stream"):
        try:
            reader.read_header()
            for _ in reader:
                pass
        except (StreamError, ChannelError):
            return
    assert reader.suspects.remaining() is not None, f"bit {bit} flipped and nothing noticed"


def test_the_checksummed_stream_reads_clean() -> None:
    dst, reader = _reader_of(CHECKED_STREAM)
    reader.read_header()
    assert reader.checksums and [type(i).__name__ for i in reader][-1] == "End"
    assert reader.suspects.remaining() is None
    assert bytes(dst[0].pages) == bytes(_blocks_filled()[0].pages)


# -- multifd packets ------------------------------------------------------------------------------

PACKET_OK = pack_header(0, 1, 0, 2, 1, 8192, 7) + np.array([3, 4, 9], dtype="<u8").tobytes()


@FUZZ
@given(data=mutated(PACKET_OK))
def test_multifd_packet(data: bytes) -> None:
    tx, rx = loopback_pair(capacity=len(data) + 1)
    tx.send(data)
    tx.close()
    with no_hang("multifd_packet"):
        try:
            pkt = read_packet(rx, 0, 2, [16, 4], compressed=False)
        except (StreamError, ChannelError):
            return
    # what was accepted is within what the destination has
    assert pkt.block < 2 and all(0 <= int(o) < [16, 4][pkt.block] for o in (*pkt.normal, *pkt.zero))


def test_the_valid_packet_is_valid() -> None:
    tx, rx = loopback_pair(capacity=len(PACKET_OK) + 1)
    tx.send(PACKET_OK)
    pkt = read_packet(rx, 0, 2, [16, 4], compressed=False)
    assert list(pkt.normal) == [3, 4] and list(pkt.zero) == [9] and PACKET.size + 24 == len(PACKET_OK)
    assert PACKET.unpack(PACKET_OK[:PACKET.size])[0] == PACKET_MAGIC


# -- xbzrle ------------------------------------------------------------------------------------------

_OLD = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
_NEW = _OLD.copy()
_NEW[100:140] ^= 0x5A
_NEW[3000] = 1
XBZRLE = bytes(xbzrle.encode(_OLD, _NEW, 4096))


@FUZZ
@given(data=mutated(XBZRLE))
def test_xbzrle_decode(data: bytes) -> None:
    page = _OLD.copy()
    with no_hang("xbzrle_decode"):
        try:
            xbzrle.decode(data, page)
        except ValueError:
            return
    assert page.shape == (4096,)


# -- msgpack arguments, unpacked as the stream reader unpacks them -----------------------------------

_REFUSED = object()


def _unpacked(data: bytes) -> object:
    """``data`` as the stream reader unpacks a command's argument; ``_REFUSED`` where it refuses it."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):  # what the reader refuses (test_stream.py)
        return _REFUSED


# -- mapped-ram headers --------------------------------------------------------------------------

_MR_BLOCKS = _blocks()
MAPPED_RAM = mapped_ram.plan(_MR_BLOCKS, 4096)[1][META_HEADER.size:]  # the section's payload, as parse gets it


@FUZZ
@given(data=mutated(MAPPED_RAM))
def test_mapped_ram_header(data: bytes) -> None:
    with no_hang("mapped_ram_header"):
        obj = _unpacked(data)
        if obj is _REFUSED:
            return
        try:
            layout = mapped_ram.parse(obj, _MR_BLOCKS, 4096)
        except ValueError:  # StreamError, or ValueError as the reader turns it into one
            return
    for r, b in zip(layout.regions, _MR_BLOCKS, strict=True):  # accepted: regions in order, aligned, apart
        assert r.pages_offset % 4096 == 0 and r.pages_offset >= r.bitmap_offset + r.bitmap_bytes
        assert r.npages == b.npages


# -- page runs: UNPOPULATED and POSTCOPY_RAM_DISCARD ---------------------------------------------

_RUN_BLOCKS = {b.name: b for b in _blocks()}  # ram0: 16 pages of 4 KiB, ram1: 4 of 8 KiB
UNPOPULATED = msgpack.packb(encode_runs({"ram0": (np.array([0, 5]), np.array([3, 16])),
                                         "ram1": (np.array([1]), np.array([4]))}))
DISCARD = msgpack.packb(postcopy_wire.discard_commands(_RUN_BLOCKS["ram0"], np.array([1, 2, 3, 9]))[0])


def _accepted(data: bytes, target: str, decode: Callable[[object], T]) -> T | None:
    """What ``decode`` makes of ``data`` unpacked as the reader does; None where either refuses it."""
    with no_hang(target):
        argument = _unpacked(data)
        if argument is _REFUSED:
            return None
        try:
            return decode(argument)
        except StreamError:
            return None


@FUZZ
@given(data=mutated(UNPOPULATED))
def test_unpopulated_runs(data: bytes) -> None:
    runs = _accepted(data, "unpopulated_runs", lambda a: decode_runs(a, _RUN_BLOCKS))
    for name, (starts, ends) in (runs or {}).items():  # accepted: ordered runs inside the block
        n = _RUN_BLOCKS[name].npages
        assert ((starts >= 0) & (starts < ends) & (ends <= n)).all() and (starts[1:] >= ends[:-1]).all()


@FUZZ
@given(data=mutated(DISCARD))
def test_postcopy_discard(data: bytes) -> None:
    got = _accepted(data, "postcopy_discard", lambda a: postcopy_wire.parse_discard(a, _RUN_BLOCKS))
    if got is not None:  # accepted: runs inside the block
        block, starts, ends = got
        assert ((starts >= 0) & (starts < ends) & (ends <= block.npages)).all()


def test_the_valid_runs_are_valid() -> None:
    assert [x.tolist() for x in decode_runs(_unpacked(UNPOPULATED), _RUN_BLOCKS)["ram0"]] == [[0, 5], [3, 16]]
    _, starts, ends = postcopy_wire.parse_discard(_unpacked(DISCARD), _RUN_BLOCKS)
    assert starts.tolist() == [1, 9] and ends.tolist() == [4, 10]


# -- device state --------------------------------------------------------------------------------

_DEVICES = DeviceRegistry()
_DEVICES.register(_Serial())
DEVICE_STATE = msgpack.packb({"regs": [1, 2, 3]})


@FUZZ
@given(data=mutated(DEVICE_STATE), version=st.integers(0, 3))
def test_device_state_section(data: bytes, version: int) -> None:
    with no_hang("device_state_section"), contextlib.suppress(DeviceStateError):  # the documented refusal
        _DEVICES.load(DeviceSection("serial", 0, version, data))


@FUZZ
@given(data=mutated(_DEVICES.save_to_buffer()))
def test_device_state_buffer(data: bytes) -> None:
    with no_hang("device_state_buffer"), contextlib.suppress(DeviceStateError):
        _DEVICES.load_from_buffer(data)


# -- dirty-bitmap sections -----------------------------------------------------------------------

#: the block nodes' files live as long as the process
_NODE_DIR = tempfile.TemporaryDirectory(prefix="mig-fuzz-nodes-")


def _bitmap_machine(side: str) -> Machine:
    m = Machine()
    m.add_block_node(BlockNode("disk0", Path(_NODE_DIR.name) / f"{side}.img", 1 << 20))
    return m


_BITMAP_SRC, _BITMAP_DST = _bitmap_machine("src"), _bitmap_machine("dst")
_BITMAP_SRC.block_nodes["disk0"].add_bitmap(DirtyBitmap("b0", 1 << 20, 4096))
_BITMAP_SRC.block_nodes["disk0"].write(5000, b"x" * 9000)
DIRTY_BITMAPS = dirty_bitmaps.section(dirty_bitmaps.plan(_BITMAP_SRC, None)).payload


@FUZZ
@given(data=mutated(DIRTY_BITMAPS))
def test_dirty_bitmap_section(data: bytes) -> None:
    node = _BITMAP_DST.block_nodes["disk0"]
    with no_hang("dirty_bitmap_section"):
        try:
            dirty_bitmaps.load(DeviceSection(dirty_bitmaps.SECTION_ID, 0, 1, data), _BITMAP_DST, None)
        except StreamError:
            assert node.bitmaps == {}  # refused: none of the section's bitmaps stays
            return
    sent = {str(e["bitmap"]): e for e in msgpack.unpackb(data, raw=False)}
    for name in list(node.bitmaps):  # accepted: a granularity QEMU allows, and exactly the bits sent
        bm = node.remove_bitmap(name)
        assert granularity_error(bm.granularity) is None
        assert np.array_equal(np.unpackbits(np.frombuffer(sent[name]["bits"], np.uint8))[:len(bm.bits)], bm.bits)


# -- block node contents (block data migration) --------------------------------------------------

def _block_records() -> tuple[bytes, BlockDataDevice]:
    """Records of a 64 KiB node with data and zero blocks (zero-blocks on); a destination device to read them."""
    src, dst = (BlockNode("disk0", Path(_NODE_DIR.name) / f"blocks-{side}.img", 64 << 10) for side in ("src", "dst"))
    src.write(4096, bytes(range(256)) * 48)
    tx = BlockDataDevice(src)
    tx.zero_blocks = True
    tx.save_setup()
    records = tx.save_state()
    tx.save_cleanup()
    rx = BlockDataDevice(dst)
    rx.load_setup()
    return records, rx


BLOCK_RECORDS, _BLOCK_RX = _block_records()


@FUZZ
@given(data=mutated(BLOCK_RECORDS))
def test_block_data_records(data: bytes) -> None:
    with no_hang("block_data_records"), contextlib.suppress(DeviceStateError):
        _BLOCK_RX.load_iterate(data)
    assert os.path.getsize(_BLOCK_RX.node.path) == _BLOCK_RX.node.size  # what is written stays inside the node


# -- QMP framing and arguments -------------------------------------------------------------------

QMP_TEXT = b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 300, "tls-creds": "a"}}\n'


@FUZZ
@given(data=mutated(QMP_TEXT * 3), split=st.integers(1, 64))
def test_qmp_framing(data: bytes, split: int) -> None:
    streamer = JsonStreamer()
    with no_hang("qmp_framing"):
        for at in range(0, len(data), split):  # arbitrary read boundaries
            for item in streamer.feed(data[at:at + split]):
                if isinstance(item, JsonInputError):
                    continue
                try:
                    json.loads(item)
                except ValueError:
                    pass  # a text the framing closed that is not JSON: the server answers with an error


_json = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=12)
_COMMANDS = sorted(COMMANDS)


@FUZZ
@given(name=st.sampled_from(_COMMANDS), args=st.dictionaries(st.text(max_size=16), _json, max_size=5),
       known=st.booleans())
def test_qmp_arguments(name: str, args: dict, known: bool) -> None:
    """Arguments for every command, with its own member names half the time, as the server checks them."""
    cmd = COMMANDS[name]
    if known and isinstance(cmd.args, type) and issubclass(cmd.args, msgspec.Struct):
        members = [f.encode_name for f in msgspec.structs.fields(cmd.args)]
        args = dict(zip(members, args.values(), strict=False)) or args
    with no_hang("qmp_arguments"):
        try:
            req = check_request({"execute": name, "arguments": args}, oob_enabled=True)
            visit_arguments(cmd, req.arguments)
        except (QMPError, QapiInputError):
            pass

