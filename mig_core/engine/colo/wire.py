"""COLO's messages on the wire: QEMU's COLOMessage numbers in COMMAND sections (main stream) and in
return-path messages, and the checkpoint's device-state buffer."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from mig_core.errors import StreamError
from mig_core.schema.migration import COLOMessage
from mig_core.stream.format import Command
from mig_core.stream.reader import CommandReceived
from mig_core.stream.writer import StreamWriter

#: QEMU's numbering: the enum's order (checkpoint-ready is 0)
NUMBER = {m: i for i, m in enumerate(COLOMessage)}
BY_NUMBER = dict(enumerate(COLOMessage))

#: the device section id whose parts carry a checkpoint's vmstate buffer
VMSTATE_ID = "colo-vmstate"
#: bytes of the vmstate buffer per DEVICE_PART section
VMSTATE_CHUNK = 4 << 20


def message(number: object, where: str) -> COLOMessage:
    """The COLOMessage numbered ``number``; StreamError in QEMU's words if it is none."""
    if isinstance(number, bool) or not isinstance(number, int) or number not in BY_NUMBER:
        raise StreamError(f"{where}: Invalid message {number!r}")
    return BY_NUMBER[number]


def send(writer: StreamWriter, msg: COLOMessage, argument: object = None) -> None:
    """A COLOMessage on the main stream (primary to secondary)."""
    writer.write_command(Command.COLO_MESSAGE, [NUMBER[msg], argument])


def parse(item: CommandReceived) -> tuple[COLOMessage, object]:
    """The COLOMessage and its argument in a COLO_MESSAGE command."""
    arg = item.argument
    if not (isinstance(arg, list) and len(arg) == 2):
        raise StreamError(f"corrupt COLO_MESSAGE command: {arg!r:.80}")
    return message(arg[0], "Got unknown COLO message"), arg[1]


def unexpected(got: COLOMessage, expected: COLOMessage) -> StreamError:
    return StreamError(f"Unexpected COLO message {NUMBER[got]}, expected {NUMBER[expected]}")


@dataclass(frozen=True)
class VmState:
    """What a checkpoint carries besides RAM: every device's state, and the messages the primary held
    (released by the primary once the secondary loaded this; released again by the secondary if it has
    to take over before then)."""

    devices: bytes
    held: list[bytes]

    def encode(self) -> bytes:
        return msgpack.packb([self.devices, self.held], use_bin_type=True)

    @classmethod
    def decode(cls, buf: bytes) -> VmState:
        try:
            devices, held = msgpack.unpackb(buf, raw=False)
            if not (isinstance(devices, bytes) and isinstance(held, list) and all(isinstance(p, bytes) for p in held)):
                raise TypeError("wrong member types")
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise StreamError(f"corrupt COLO vmstate buffer: {e}") from None
        return cls(devices, held)
