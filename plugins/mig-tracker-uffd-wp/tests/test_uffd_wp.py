"""The uffd-wp tracker is installed, discovered, preferred, exact, and refuses blocks it cannot serve."""

import numpy as np

from mig_core.dirty import select_tracker
from mig_core.machine import uffd
from mig_core.machine.ram import Backing, allocate
from mig_core.plugin_registry import PluginRegistry


def test_discovered_and_preferred():
    reg = PluginRegistry()
    assert reg.choice("dirty_trackers", "uffd-wp").distribution == "mig-tracker-uffd-wp"
    blocks = [allocate("ram", 1 << 20)]
    assert select_tracker(blocks, reg).cls.name == "uffd-wp"


def test_exact_pages_and_release():
    cls = PluginRegistry().load("mig_core.dirty_trackers", "uffd-wp")
    for backing in (Backing.MEMFD, Backing.ANONYMOUS):
        b = allocate("ram", 4 << 20, backing=backing)
        t = cls([b])
        c = t.consumer("c")
        c.collect()
        idx = np.array([0, 1, 2, 500, 1023])
        b.pages[idx, 7] = 1
        b.view[600 * 4096] = 9  # a write through a memoryview is seen as well
        assert list(c.collect().pages["ram"]) == [0, 1, 2, 500, 600, 1023]
        assert len(c.collect().pages["ram"]) == 0
        t.close()
        assert uffd.REGISTRY.registration(b) is None  # the registration went with the tracker
        b.close()
