"""Payloads of the postcopy commands on the main stream: advise, discard ranges, the device package.

The advise ``[page sizes OR-ed, target page size]`` (QEMU's POSTCOPY_ADVISE) is
the ``postcopy-advise`` member of CONFIG when postcopy-ram is on: the destination
reads it before its multifd channels start, so it drops its RAM before any page
lands. At the switch, POSTCOPY_RAM_DISCARD ``[block, runs]`` (runs:
little-endian u64 pairs ``start, end`` of pages, half-open) names the pages the
source will still send; the destination drops whatever it holds there and
treats them as missing. PACKAGED ``[token, count]`` is followed by ``count``
DEVICE sections, read whole before anything of it is applied: the destination
then hands the connection to its page server, loads the devices, runs, and
answers PONG ``token``.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Sequence

import numpy as np

from mig_core.errors import StreamError
from mig_core.ext.channel import Channel, ChannelEOF
from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock

#: Runs per POSTCOPY_RAM_DISCARD command (16 bytes each: 1 MiB of runs per section at most).
DISCARD_RUNS_PER_COMMAND = 1 << 16

#: The page size every RAM page is a multiple of (QEMU's target page).
TARGET_PAGE_SIZE = 4096


def advise(blocks: Sequence[RAMBlock]) -> list[int]:
    """The ADVISE argument: every block's page size OR-ed together, and the target page size."""
    sizes = 0
    for b in blocks:
        sizes |= b.page_size
    return [sizes, TARGET_PAGE_SIZE]


def check_advise(argument: object, blocks: Sequence[RAMBlock]) -> None:
    """Refuse an advise whose page sizes differ from this host's (QEMU's texts)."""
    if not (isinstance(argument, list) and len(argument) == 2 and all(isinstance(x, int) for x in argument)):
        raise StreamError(f"the postcopy advise needs [page sizes, target page size], got {argument!r}")
    theirs, target = argument
    mine = advise(blocks)
    if theirs != mine[0]:
        raise StreamError(f"Postcopy needs matching RAM page sizes (s={theirs:x} d={mine[0]:x})")
    if target != TARGET_PAGE_SIZE:
        raise StreamError(f"Postcopy needs matching target page sizes (s={target} d={TARGET_PAGE_SIZE})")


def discard_commands(block: RAMBlock, pages: np.ndarray) -> list[list[object]]:
    """The POSTCOPY_RAM_DISCARD arguments naming ``pages`` (sorted) of ``block``: at least one, maybe empty."""
    starts, ends = pages_to_runs(pages)
    runs = np.empty((len(starts), 2), dtype="<u8")
    runs[:, 0], runs[:, 1] = starts, ends
    out: list[list[object]] = []
    for i in range(0, max(len(runs), 1), DISCARD_RUNS_PER_COMMAND):
        out.append([block.name, runs[i:i + DISCARD_RUNS_PER_COMMAND].tobytes()])
    return out


def parse_discard(argument: object, blocks: dict[str, RAMBlock]) -> tuple[RAMBlock, np.ndarray, np.ndarray]:
    """(block, starts, ends) of a POSTCOPY_RAM_DISCARD argument, every run checked against the block."""
    if not (isinstance(argument, list) and len(argument) == 2 and isinstance(argument[0], str)
            and isinstance(argument[1], bytes)):
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD needs [block, runs], got {argument!r:.80}")
    name, raw = argument
    block = blocks.get(name)
    if block is None:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD names RAM block '{name}', which this host does not have")
    if len(raw) % 16:
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD for '{name}': invalid length {len(raw)}")
    # checked as the unsigned numbers they are: a start of 2**63 or more would turn negative as int64 and
    # name pages counted from the block's end
    runs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    starts, ends = runs[:, 0], runs[:, 1]
    if len(runs) and not (bool((starts < ends).all()) and int(ends.max()) <= block.npages):
        raise StreamError(f"CMD_POSTCOPY_RAM_DISCARD for '{name}': a range outside its {block.npages} pages")
    return block, starts.astype(np.int64), ends.astype(np.int64)


def package(argument: object) -> tuple[int, int]:
    """(PONG token, number of DEVICE sections that follow) of a PACKAGED command."""
    if not (isinstance(argument, list) and len(argument) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in argument)):
        raise StreamError(f"CMD_PACKAGED needs [token, device count], got {argument!r}")
    return argument[0], argument[1]


#: First bytes of a postcopy-preempt connection (then the source's uuid): page batches follow, nothing else.
PREEMPT_MAGIC = b"MIGPRMPT"


def preempt_header(source_uuid: str) -> bytes:
    return PREEMPT_MAGIC + uuid_mod.UUID(source_uuid).bytes


def read_preempt_header(channel: Channel, source_uuid: str) -> None:
    """Check that ``channel`` is the preempt connection of the source ``source_uuid`` (StreamError if not)."""
    try:
        head = channel.recv_exact(len(PREEMPT_MAGIC) + 16)
    except ChannelEOF:
        raise StreamError("the postcopy-preempt connection closed before its header") from None
    if head[:len(PREEMPT_MAGIC)] != PREEMPT_MAGIC:
        raise StreamError(f"expected the postcopy-preempt connection, got one starting {head[:8]!r}")
    theirs = str(uuid_mod.UUID(bytes=head[len(PREEMPT_MAGIC):]))
    if theirs != source_uuid:
        raise StreamError(f"a postcopy-preempt connection from source {theirs}, not {source_uuid}")
