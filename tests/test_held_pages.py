"""A destination's held pages: the source's unpopulated runs on the wire, read in the background while the
stream loads, and the end dropping exactly the held data of pages that never arrived."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mig_core.engine.held_pages import HeldPages, decode_runs, encode_runs, unpopulated
from mig_core.errors import StreamError
from mig_core.memory import ram
from mig_core.memory.ram import Backing
from mig_core.stream.placement import CopyPlacer

NPAGES = 4 * 16384 + 100  # more than one background chunk, and a partial one


@pytest.fixture
def blocks():
    out = [ram.allocate("ram0", NPAGES * 4096, backing=Backing.MEMFD),
           ram.allocate("ram1", 64 * 4096, backing=Backing.ANONYMOUS)]
    yield out
    for b in out:
        b.close()


def _fill(b: ram.RAMBlock, pages: np.ndarray) -> None:
    """Data in ``pages`` (the last word of each, so a first-word test would miss it)."""
    b.words[pages, -1] = pages.astype(np.uint64) + 1


def test_unpopulated_runs_are_the_gaps_between_reported_pages(blocks):
    b0, b1 = blocks
    pending = {"ram0": np.concatenate([np.arange(5, 10), np.arange(20, NPAGES - 1)]), "ram1": np.arange(64)}
    runs = unpopulated(blocks, pending)
    assert list(runs) == ["ram0"]  # a block reported whole has no gaps
    starts, ends = runs["ram0"]
    assert starts.tolist() == [0, 10, NPAGES - 1] and ends.tolist() == [5, 20, NPAGES]
    assert unpopulated(blocks, pending, skip={"ram0"}) == {}
    decoded = decode_runs(encode_runs(runs), {b.name: b for b in blocks})
    assert [x.tolist() for x in decoded["ram0"]] == [starts.tolist(), ends.tolist()]


@pytest.mark.parametrize(("argument", "error"), [
    ([1, 2], "UNPOPULATED: expected a map of block names to page runs"),
    ({"nope": [b"", b""]}, "UNPOPULATED: unknown RAM block 'nope'"),
    ({"ram1": [b"\0" * 8]}, "UNPOPULATED: malformed page runs for RAM block 'ram1'"),
    ({"ram1": [b"\0" * 8, b"\0" * 4]}, "UNPOPULATED: malformed page runs for RAM block 'ram1'"),
    ({"ram1": encode_runs({"x": (np.array([4]), np.array([4]))})["x"]},
     "UNPOPULATED: page runs out of order or past the end of RAM block 'ram1'"),
    ({"ram1": encode_runs({"x": (np.array([0, 5]), np.array([10, 12]))})["x"]},
     "UNPOPULATED: page runs out of order or past the end of RAM block 'ram1'"),
    ({"ram1": encode_runs({"x": (np.array([60]), np.array([65]))})["x"]},
     "UNPOPULATED: page runs out of order or past the end of RAM block 'ram1'"),
    # a start of 2**64 - 5: read as int64 it would be -5, a run that seemed to end inside the block
    ({"ram1": [(2**64 - 5).to_bytes(8, "little"), (3).to_bytes(8, "little")]},
     "UNPOPULATED: page runs out of order or past the end of RAM block 'ram1'"),
])
def test_bad_unpopulated_runs_are_refused(blocks, argument, error):
    with pytest.raises(StreamError) as e:
        decode_runs(argument, {b.name: b for b in blocks})
    assert str(e.value) == error


_U64 = st.one_of(st.integers(0, 80), st.integers(2**63 - 2, 2**63 + 2), st.integers(2**64 - 80, 2**64 - 1),
                 st.integers(0, 2**64 - 1))  # the block's size, int64's sign bit, the top, anything


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(_U64, _U64), max_size=6))
def test_unpopulated_runs_lie_inside_the_block_in_order_or_are_refused(blocks, pairs):
    """Whatever u64 runs arrive, those handed on are ordered and inside the block, or the command is refused."""
    argument = {"ram1": [b"".join(s.to_bytes(8, "little") for s, _ in pairs),
                         b"".join(e.to_bytes(8, "little") for _, e in pairs)]}
    try:
        starts, ends = decode_runs(argument, {b.name: b for b in blocks})["ram1"]
    except StreamError:
        return
    assert ((starts >= 0) & (starts < ends) & (ends <= 64)).all() and (starts[1:] >= ends[:-1]).all()


def _scenario(blocks):
    """ram0 held whole (some pages with data, some zero); the source holds no data from page 1000 on; of
    those, a few arrive after all (written on the source later) and must keep what arrived."""
    b0, b1 = blocks
    b0.array[:] = 0
    data = np.arange(0, NPAGES, 7)
    _fill(b0, data)
    placer = CopyPlacer(blocks)
    held = HeldPages(blocks, {"ram0": (np.array([0]), np.array([NPAGES])), "ram1": (np.array([]), np.array([]))})
    return b0, data, placer, held


def _expect(b0, data, placer, arrived):
    stale = data[(data >= 1000) & ~np.isin(data, arrived)]
    kept = data[~np.isin(data, stale)]
    assert not b0.words[stale].any()  # dropped: zero now
    assert (b0.words[kept, -1] == kept.astype(np.uint64) + 1).all()  # what arrived or was sent stays
    return len(stale)


def test_what_the_background_read_is_not_read_again_at_the_end(blocks):
    b0, data, placer, held = _scenario(blocks)
    placer.received["ram0"][:1000] = True  # pass 1 sent the populated pages
    held.scan_unpopulated({"ram0": (np.array([1000]), np.array([NPAGES]))}, placer.received)
    held.wait()
    arrived = np.array([1001, 5005, NPAGES - 2])  # written on the source after its first sync
    placer.place(b0, arrived, None)
    early, late, dropped = held.drop_unsent(placer)
    assert (early, late) == (NPAGES - 1000 - len(arrived), 0)
    assert dropped == _expect(b0, data, placer, arrived)


def test_without_the_source_naming_them_the_end_reads_everything(blocks):
    b0, data, placer, held = _scenario(blocks)
    placer.received["ram0"][:1000] = True
    early, late, dropped = held.drop_unsent(placer)
    assert (early, late) == (0, NPAGES - 1000)
    assert dropped == _expect(b0, data, placer, np.array([], dtype=np.int64))


def test_a_second_naming_is_refused_and_a_stopped_read_is_finished_at_the_end(blocks):
    b0, data, placer, held = _scenario(blocks)
    placer.received["ram0"][:1000] = True
    held.scan_unpopulated({"ram0": (np.array([1000]), np.array([NPAGES]))}, placer.received)
    with pytest.raises(StreamError, match="UNPOPULATED: sent twice in one stream"):
        held.scan_unpopulated({"ram0": (np.array([1000]), np.array([NPAGES]))}, placer.received)
    held.stop()  # wherever it got to: the end reads the rest
    early, late, dropped = held.drop_unsent(placer)
    assert early + late == NPAGES - 1000
    assert dropped == _expect(b0, data, placer, np.array([], dtype=np.int64))
