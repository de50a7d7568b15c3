"""Finding an accelerator's library and devices, for plugins whose hardware may be absent (qpl, uadk).

Nothing is required: a plugin probes, reports what it found and which code path
runs, and falls back to software. The library is looked up as the dynamic
linker would (ctypes) and must actually load; devices are a glob that an
environment variable may override (for a non-standard layout).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class AcceleratorProbe:
    """What a probe found: the library's name if it loads, and the device nodes."""

    library: str | None
    devices: tuple[str, ...]

    def describe(self, software: str, library: str, devices: str, unused: str) -> str:
        """Which path runs and why, e.g. ``software (ISA-L): libqpl not found``.

        ``software`` names the path that runs, ``library`` and ``devices`` what was looked for,
        ``unused`` why what was found is still not used (the plugin has no bindings).
        """
        if self.library and self.devices:
            return (f"{software}: {library} ({self.library}) and {len(self.devices)} {devices} found, "
                    f"but {unused}")
        if self.library:
            return f"{software}: {library} ({self.library}) found, no {devices}"
        return f"{software}: {library} not found"


def probe(library: str, devices: str, devices_env: str) -> AcceleratorProbe:
    """Look for ``lib<library>`` and the device glob (``$devices_env`` overrides ``devices``)."""
    found = None
    name = ctypes.util.find_library(library)
    if name:
        try:
            ctypes.CDLL(name)
            found = name
        except OSError:
            found = None
    return AcceleratorProbe(found, tuple(sorted(glob.glob(os.environ.get(devices_env, devices)))))
