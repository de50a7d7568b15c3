"""Iterative device state during precopy: what devices still have to send, and one pass of sending it.

The source asks every device's ``state_pending()`` once per dirty sync; that figure is both what the
switchover decision counts and the budget each device gets in the next pass (a device that keeps
changing cannot hold a pass forever).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mig_core.engine import dirty_bitmaps
from mig_core.engine.dirty_bitmaps import OutgoingBitmap
from mig_core.errors import DeviceStateError
from mig_core.machine.device import Device, DeviceRegistry, DeviceSection
from mig_core.stream.writer import StreamWriter

#: The most a device's save_iterate is asked for at once (one DEVICE_PART section).
DEVICE_CHUNK = 1 << 20


class DeviceIteration:
    """The devices' iterative state for one outgoing migration."""

    def __init__(self, devices: DeviceRegistry) -> None:
        self.devices = devices
        self._budgets: list[tuple[Device, int]] = []
        #: bytes of state sent by devices marked ``vfio`` (query-migrate's VfioStats.transferred)
        self.vfio_bytes = 0
        #: dirty-bitmaps: the block nodes' bitmaps that go with the final state
        self.bitmaps: list[OutgoingBitmap] = []

    @property
    def has_vfio(self) -> bool:
        """A device marked ``vfio`` is registered (query-migrate then shows ``vfio``)."""
        return any(dev.vfio for dev in self.devices)

    def save_final(self, writer: StreamWriter) -> None:
        """Every device's final state (vCPUs stopped), counted for ``vfio`` like its chunks."""
        for dev in self.devices:
            self.write_final(writer, dev, self.devices.save(dev))
        if self.bitmaps:
            writer.write_device(dirty_bitmaps.section(self.bitmaps))

    def write_final(self, writer: StreamWriter, dev: Device, section: DeviceSection) -> None:
        writer.write_device(section)
        if dev.vfio:
            self.vfio_bytes += len(section.payload)

    def sync(self) -> int:
        """Ask every device what it still has to send (must-precopy and can-postcopy: precopy sends both)."""
        self._budgets = [(dev, dev.state_pending().total) for dev in self.devices]
        return sum(n for _, n in self._budgets)

    def send_pass(self, writer: StreamWriter, check: Callable[[], None],
                  sent: Callable[[], None]) -> tuple[int, float]:
        """Ask each device with pending bytes for chunks until it has nothing more or has sent what it
        reported at the last sync; ``check`` raises to stop, ``sent`` runs after each chunk is written
        (accounting, rate limit). Returns (bytes, ms)."""
        total = 0
        t0 = time.monotonic()
        for dev, budget in self._budgets:
            given = 0
            while given < budget:
                check()
                chunk = dev.save_iterate(min(DEVICE_CHUNK, budget - given))
                if chunk is None or len(chunk) == 0:
                    break
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise DeviceStateError(f"device '{dev.id}' instance {dev.instance}: save_iterate returned "
                                           f"{type(chunk).__name__}, not bytes")
                writer.write_device_part(dev.id, dev.instance, dev.version, bytes(chunk))
                given += len(chunk)
                if dev.vfio:
                    self.vfio_bytes += len(chunk)
                sent()
            total += given
        return total, (time.monotonic() - t0) * 1000
