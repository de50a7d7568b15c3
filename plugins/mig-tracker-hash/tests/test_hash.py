"""The hash tracker is installed, discovered, and reports content changes, including a change undone."""

import numpy as np
from mig_tracker_hash import hash_pages

from mig_core import PluginRegistry
from mig_core.memory.ram import allocate
from mig_core.testing.contracts import DirtyTrackerContract


def test_discovered():
    assert PluginRegistry().choice("dirty_trackers", "hash").distribution == "mig-tracker-hash"


def test_reports_what_differs_from_what_was_sent():
    cls = PluginRegistry().load("mig_core.dirty_trackers", "hash")
    b = allocate("ram", 1 << 20)
    b.pages[3] = 1
    t = cls([b])
    c = t.consumer("migration", sends=True)
    assert c.wants_copies
    r = c.collect()
    assert list(r.pages["ram"]) == [3]  # only the populated, non-zero page
    c.sent(b, r.pages["ram"], b.pages[r.pages["ram"]])
    assert len(c.collect().pages["ram"]) == 0
    b.pages[3, 0] = 2
    b.pages[3, 0] = 1  # changed and changed back before the next pass: nothing to send
    assert len(c.collect().pages["ram"]) == 0
    b.pages[10, 5] = 4
    assert list(c.collect().pages["ram"]) == [10]
    assert len(hash_pages(np.zeros((0, 4096), np.uint8))) == 0
    b.close()


class TestContract(DirtyTrackerContract):
    """mig's dirty-tracker contract (mig_core.testing.contracts), as every tracker plugin runs it."""

    name = "hash"
    distribution = "mig-tracker-hash"
