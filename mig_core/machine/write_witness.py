"""Which pages of freshly preallocated RAM were written since: how a destination knows, without reading them,
that its pages still hold the zeros the kernel gave them.

A destination drops the data of every page it holds that the source never sends. Not knowing which held
pages were ever written, it read them all once the last page had arrived (35 ms per GiB on this project's
2-core machine) while the guest waited: QEMU reads them too, as the zero pages arrive. Right after
preallocation an anonymous block is all zeros. Write-protected then (userfaultfd in async mode: a write never
blocks, the kernel only marks the page), one walk of the page tables later says which pages were written
since; the witness then lets go, before the migration writes anything, so loading costs no fault.

Only blocks mapped with huge pages are watched: protecting and letting go of a GiB then take 3.5 and 0.5 ms
here, against 14 and 25 ms page by page, which would hold up the start of the load more than the read it
saves. Other blocks, and every block where userfaultfd or PAGEMAP_SCAN is missing, are read as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import structlog

from mig_core.errors import MigError
from mig_core.host import uffd
from mig_core.memory import pagemap
from mig_core.memory.ram import Backing, RAMBlock

log = structlog.get_logger("mig.ram")

#: share of a block that must be mapped with huge pages for the witness to watch it
HUGE_SHARE = 0.9

Runs = tuple[np.ndarray, np.ndarray]


class WriteWitness:
    """Watches fresh, preallocated anonymous blocks for writes until ``written_runs`` or ``release``."""

    def __init__(self, blocks: Sequence[RAMBlock]) -> None:
        self._regs: dict[str, uffd.Registration] = {}
        for b in blocks:
            if b.backing is not Backing.ANONYMOUS:
                continue  # a file or memfd may hold data already; its holes are known without a witness
            why = self._arm(b)
            log.info("write_witness", block=b.name, watched=why is None, **({"why_not": why} if why else {}))

    def _arm(self, b: RAMBlock) -> str | None:
        """Protect the block if it qualifies; why not otherwise."""
        try:
            starts, ends = pagemap.scanner().scan_runs(b.address, b.size, b.page_size,
                                                       category_mask=pagemap.PAGE_IS_HUGE,
                                                       return_mask=pagemap.PAGE_IS_HUGE)
        except OSError as e:
            return f"PAGEMAP_SCAN: {e.strerror}"
        if int((ends - starts).sum()) < HUGE_SHARE * b.npages:
            return "not mapped with huge pages"
        try:
            reg = uffd.REGISTRY.register(b, uffd.Mode.WP_ASYNC, owner="write witness")
        except (OSError, MigError) as e:  # no userfaultfd here, or the block is taken
            return str(e)
        try:
            pagemap.scanner().protect_written(b.address, b.size, b.page_size)
        except OSError as e:
            uffd.REGISTRY.unregister(reg)
            return f"write-protect: {e.strerror}"
        self._regs[b.name] = reg
        return None

    @property
    def watched(self) -> list[str]:
        """The names of the blocks it watches now."""
        return list(self._regs)

    def written_runs(self) -> dict[str, Runs]:
        """The pages written since each watched block was protected (half-open runs), then let go of all: a
        block missing from the answer must be read."""
        out: dict[str, Runs] = {}
        for name, reg in self._regs.items():
            b = reg.block
            try:
                out[name] = pagemap.scanner().written_runs(b.address, b.size, b.page_size)
            except OSError as e:  # the registration went away (remapped): no answer, the block is read
                log.warning("write_witness_lost", block=name, error=e.strerror)
        self.release()
        return out

    def release(self) -> None:
        """Let go of every block (writes cost no fault from here on)."""
        for reg in self._regs.values():
            uffd.REGISTRY.unregister(reg)
        self._regs.clear()
