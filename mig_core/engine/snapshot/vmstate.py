"""The device-state stream of a snapshot: mig's stream format without RAM pages.

It starts with the header and the block list (so a load checks the machine has the same RAM blocks),
carries every device's iterative parts and final state, and ends with the END marker. Snapshots keep
it beside their RAM; ``xen-save-devices-state`` writes it to a file on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import structlog

from mig_core.engine.device_iteration import DeviceIteration
from mig_core.errors import StreamError
from mig_core.ext.memory_channel import BytesChannel
from mig_core.machine.device import DeviceSection, PendingStates
from mig_core.machine.machine import Machine
from mig_core.memory.ram import RAMBlock
from mig_core.stream.placement import PagePlacer
from mig_core.stream.reader import DevicePart, End, StreamReader
from mig_core.stream.writer import StreamWriter

log = structlog.get_logger("mig.snapshot")


def write_device_sections(machine: Machine, writer: StreamWriter) -> None:
    """Every device's state, complete, as stream sections (the machine is stopped: iterative devices
    drain in one go, then each device's final state)."""
    devices = list(machine.devices)
    for dev in devices:
        dev.save_setup()
    try:
        iteration = DeviceIteration(machine.devices)
        while iteration.sync():
            sent, _ms = iteration.send_pass(writer, lambda: None, lambda: None)
            if not sent:
                break  # pending but nothing given: its save_state carries the rest
        for dev in devices:
            writer.write_device(machine.devices.save(dev))
    finally:
        for dev in devices:
            dev.save_cleanup()


def device_sections(machine: Machine) -> bytes:
    """``write_device_sections`` into bytes (to be appended to a stream later, as a background snapshot does)."""
    out = BytesChannel()
    write_device_sections(machine, StreamWriter(out, machine.blocks))
    return out.data


def save_device_state(machine: Machine) -> bytes:
    """A device-state stream: header and block list, every device's state, the end marker."""
    out = BytesChannel()
    writer = StreamWriter(out, machine.blocks)
    writer.write_header(machine.uuid)
    write_device_sections(machine, writer)
    writer.write_end()
    return out.data


@dataclass
class DeviceStateLoad:
    """A device-state stream read and validated, not yet applied (``apply`` does that)."""

    machine: Machine
    states: PendingStates
    parts: list[DevicePart] = field(default_factory=list)

    def apply(self) -> None:
        """Hand the iterative parts to their devices, then every final state (all validated already)."""
        devices = list(self.machine.devices)
        for dev in devices:
            dev.load_setup()
        try:
            for part in self.parts:
                self.machine.devices.lookup(part.id, part.instance, part.version).load_iterate(part.chunk)
            self.states.apply()
        finally:
            for dev in devices:
                dev.load_cleanup()


class _NoPages(PagePlacer):
    """A device-state stream carries no pages: one that does is refused before it touches RAM."""

    reads_back = False

    def place(self, block: RAMBlock, pages: np.ndarray, data: np.ndarray | None) -> None:
        raise StreamError("a device-state stream holds only device state, not RAM pages")

    def place_zero(self, block: RAMBlock, pages: np.ndarray) -> None:
        self.place(block, pages, None)


def read_device_state(machine: Machine, data: bytes) -> DeviceStateLoad:
    """Parse and validate a device-state stream against this machine (its blocks and devices);
    StreamError / DeviceStateError say what does not fit. Nothing is applied."""
    reader = StreamReader(BytesChannel(data), machine.blocks, _NoPages(machine.blocks))
    reader.read_header()
    load = DeviceStateLoad(machine, machine.devices.pending())
    while True:
        item = reader.next()
        if isinstance(item, DeviceSection):
            load.states.add(item)
        elif isinstance(item, DevicePart):
            machine.devices.lookup(item.id, item.instance, item.version)  # a device this machine has
            load.parts.append(item)
        elif isinstance(item, End):
            break
        else:
            raise StreamError(f"a device-state stream holds only device state, not {type(item).__name__}")
    load.states.check_complete()
    return load
