"""The return path: the destination's messages to the source, typed, and each side's end of it.

With the ``return-path`` capability the source sends OPEN_RETURN_PATH and the
destination answers on the same connection (COMMAND sections, ``RP_*``). Today
it carries round-trip probes (PING → ``Pong``), the end of the load
(``Loaded``, or ``Shut`` with an error code), the destination's switchover ack,
and postcopy's page requests and a recovery's received-bitmap and resume-ack.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mig_core.errors import MigrationFailed, StreamError
from mig_core.ext.channel import Channel, ChannelError
from mig_core.stream.format import Command
from mig_core.stream.placement import CopyPlacer
from mig_core.stream.reader import CommandReceived, StreamReader
from mig_core.stream.writer import StreamWriter

log = structlog.get_logger("mig.return_path")


@dataclass(frozen=True)
class Pong:
    """The answer to the source's PING ``token``: everything sent before that PING has been loaded."""

    token: int


@dataclass(frozen=True)
class Loaded:
    """The destination loaded everything and runs (or stays paused as it must); ``code`` 0 is success."""

    code: int = 0


@dataclass(frozen=True)
class Shut:
    """The destination gave up (``code`` non-zero) or closes the return path (0)."""

    code: int


@dataclass(frozen=True)
class RequestPages:
    """Postcopy: the destination faulted on ``length`` bytes at ``offset`` of ``block`` and needs them now."""

    block: str
    offset: int
    length: int


@dataclass(frozen=True)
class ReceivedBitmap:
    """Postcopy recovery: the pages of ``block`` the destination holds (``numpy.packbits`` of a bool per page)."""

    block: str
    bitmap: bytes


@dataclass(frozen=True)
class ResumeAck:
    """Postcopy recovery: the destination is ready to resume (``value`` echoes the source's)."""

    value: int


@dataclass(frozen=True)
class SwitchoverAck:
    """The destination agrees to switch over (the ``switchover-ack`` capability)."""


@dataclass(frozen=True)
class ColoReply:
    """COLO: the secondary's COLOMessage (checkpoint-ready, -reply, vmstate-received, -loaded) by number."""

    value: int


@dataclass(frozen=True)
class ColoOutput:
    """COLO: a message the secondary's program emitted, for the primary to compare with its own."""

    packet: bytes


@dataclass(frozen=True)
class ColoHeartbeat:
    """COLO: the secondary is alive."""


ColoTraffic = ColoReply | ColoOutput | ColoHeartbeat
Message = Pong | Loaded | Shut | RequestPages | ReceivedBitmap | ResumeAck | SwitchoverAck | ColoTraffic


def encode(msg: Message) -> tuple[Command, object]:
    """The COMMAND section (command, argument) that carries ``msg``."""
    if isinstance(msg, Pong):
        return Command.RP_PONG, msg.token
    if isinstance(msg, Loaded):
        return Command.RP_LOADED, msg.code
    if isinstance(msg, Shut):
        return Command.RP_SHUT, msg.code
    if isinstance(msg, RequestPages):
        return Command.RP_REQ_PAGES, [msg.block, msg.offset, msg.length]
    if isinstance(msg, ReceivedBitmap):
        return Command.RP_RECV_BITMAP, [msg.block, msg.bitmap]
    if isinstance(msg, ResumeAck):
        return Command.RP_RESUME_ACK, msg.value
    if isinstance(msg, ColoReply):
        return Command.RP_COLO_MESSAGE, msg.value
    if isinstance(msg, ColoOutput):
        return Command.RP_COLO_OUTPUT, msg.packet
    if isinstance(msg, ColoHeartbeat):
        return Command.RP_COLO_HEARTBEAT, None
    return Command.RP_SWITCHOVER_ACK, None


def _int(arg: object, what: str) -> int:
    if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
        raise StreamError(f"return path: {what} needs a non-negative integer, got {arg!r}")
    return arg


def decode(item: CommandReceived) -> Message:
    """The typed message in a COMMAND section read from the return path; StreamError if it is not one."""
    cmd, arg = item.command, item.argument
    if cmd is Command.RP_PONG:
        return Pong(_int(arg or 0, "PONG"))
    if cmd is Command.RP_LOADED:
        return Loaded(_int(arg or 0, "LOADED"))
    if cmd is Command.RP_SHUT:
        return Shut(_int(arg or 0, "SHUT"))
    if cmd is Command.RP_REQ_PAGES:
        if not (isinstance(arg, list) and len(arg) == 3 and isinstance(arg[0], str)):
            raise StreamError(f"return path: REQ_PAGES needs [block, offset, length], got {arg!r}")
        return RequestPages(arg[0], _int(arg[1], "REQ_PAGES offset"), _int(arg[2], "REQ_PAGES length"))
    if cmd is Command.RP_RECV_BITMAP:
        if not (isinstance(arg, list) and len(arg) == 2 and isinstance(arg[0], str) and isinstance(arg[1], bytes)):
            raise StreamError(f"return path: RECV_BITMAP needs [block, bitmap], got {arg!r:.80}")
        return ReceivedBitmap(arg[0], arg[1])
    if cmd is Command.RP_RESUME_ACK:
        return ResumeAck(_int(arg, "RESUME_ACK"))
    if cmd is Command.RP_SWITCHOVER_ACK:
        return SwitchoverAck()
    if cmd is Command.RP_COLO_MESSAGE:
        return ColoReply(_int(arg, "COLO_MESSAGE"))
    if cmd is Command.RP_COLO_OUTPUT:
        if not isinstance(arg, bytes):
            raise StreamError(f"return path: COLO_OUTPUT needs bytes, got {type(arg).__name__}")
        return ColoOutput(arg)
    if cmd is Command.RP_COLO_HEARTBEAT:
        return ColoHeartbeat()
    raise StreamError(f"return path: {cmd.name} is not a return-path message")


class DestinationReturnPath:
    """The destination's end: sends typed messages on the migration connection."""

    def __init__(self, channel: Channel) -> None:
        self._writer = StreamWriter(channel, [])
        self._lock = threading.Lock()

    def send(self, msg: Message) -> None:
        command, argument = encode(msg)
        self.send_raw(command, argument)

    def send_raw(self, command: Command, argument: object) -> None:
        """Send an encoded message (one the host asked the postcopy page server to pass on)."""
        with self._lock:
            self._writer.write_command(command, argument)


class SourceReturnPath:
    """The source's end: a thread (``mig/src/rp_thr``) that reads the destination's messages.

    It answers the engine's two questions: has the destination loaded everything sent before a
    PING (``ping``), and how did the load end (``await_end``). A broken return path or a message
    the source does not expect (a page request before postcopy exists) ends the migration.
    """

    def __init__(self, channel: Channel, send_ping: Callable[[int], None]) -> None:
        self._channel = channel
        self._send_ping = send_ping
        self._pong = threading.Condition()
        self._pong_seen = -1
        self._ended = threading.Event()
        self._code: int | None = None
        self._error: str | None = None
        self._first_ping = 0.0
        #: Round trip of the first PING (sent at setup), in milliseconds; feeds the downtime estimate.
        self.rtt_ms = 0.0
        #: Called on this thread for every PONG (postcopy ends its downtime on the package's).
        self.on_pong: Callable[[Pong], None] | None = None
        #: Called on this thread for every page request (set while postcopy runs; a StreamError ends it).
        self.on_request: Callable[[RequestPages], None] | None = None
        #: Called on this thread for a recovery's messages (received bitmaps, the resume ack).
        self.on_recovery: Callable[[ReceivedBitmap | ResumeAck], None] | None = None
        #: Called on this thread for COLO's replies, outputs and heartbeats (set while COLO runs).
        self.on_colo: Callable[[ColoTraffic], None] | None = None
        #: Called on this thread when the return path ends by an error (COLO wakes its loop with it).
        self.on_broken: Callable[[], None] | None = None
        #: Set when the destination acknowledged the switchover (the ``switchover-ack`` capability).
        self.switchover_acked = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mig/src/rp_thr", daemon=True)

    def start(self, ping: bool = True) -> None:
        """Start reading; ``ping`` measures the round trip first (not on a postcopy recovery's connection)."""
        self.thread.start()
        if ping:
            self._first_ping = time.monotonic()
            self._send_ping(0)

    @property
    def broken(self) -> bool:
        """True if the return path ended by an I/O or protocol error (not by the destination's verdict)."""
        return self._ended.is_set() and self._error is not None
    def failure(self) -> str | None:
        """Why the destination can no longer succeed (it gave up, or the return path broke); None if it still can."""
        if not self._ended.is_set():
            return None
        if self._error is not None:
            return self._error
        return f"Sibling indicated error {self._code}" if self._code else None

    def ping(self, token: int, check: Callable[[], None]) -> float:
        """PING with ``token`` and wait for its PONG (``check`` raises to stop waiting); milliseconds it took."""
        t0 = time.monotonic()
        self._send_ping(token)
        with self._pong:
            while self._pong_seen < token and not self._ended.is_set():
                check()
                self._pong.wait(0.1)
        check()
        return (time.monotonic() - t0) * 1000

    def await_end(self, check: Callable[[], None]) -> None:
        """Wait for the destination's verdict on the load; MigrationFailed unless it loaded everything."""
        self._ended.wait()
        check()
        failure = self.failure()
        if failure is not None:
            raise MigrationFailed(failure)

    def wake(self) -> None:
        """Release every waiter (a cancel): they then see the cancel in their ``check``."""
        self._ended.set()
        with self._pong:
            self._pong.notify_all()

    def join(self, timeout: float) -> None:
        if self.thread.ident is not None:
            self.thread.join(timeout)

    def _run(self) -> None:
        reader = StreamReader(self._channel, [], CopyPlacer([]))
        try:
            while True:
                item = reader.next()
                if not isinstance(item, CommandReceived):
                    raise StreamError(f"return path: unexpected {type(item).__name__}")
                msg = decode(item)
                if isinstance(msg, Pong):
                    if msg.token == 0:
                        self.rtt_ms = (time.monotonic() - self._first_ping) * 1000
                    with self._pong:
                        self._pong_seen = max(self._pong_seen, msg.token)
                        self._pong.notify_all()
                    if self.on_pong is not None:
                        self.on_pong(msg)
                elif isinstance(msg, RequestPages) and self.on_request is not None:
                    self.on_request(msg)
                elif isinstance(msg, ReceivedBitmap | ResumeAck) and self.on_recovery is not None:
                    self.on_recovery(msg)
                elif isinstance(msg, ColoReply | ColoOutput | ColoHeartbeat) and self.on_colo is not None:
                    self.on_colo(msg)
                elif isinstance(msg, SwitchoverAck):
                    log.info("switchover_ack_received")
                    self.switchover_acked.set()
                elif isinstance(msg, Loaded | Shut):
                    self._code = msg.code
                    return
                else:  # page requests and recovery messages outside postcopy, COLO traffic outside COLO
                    raise StreamError(f"return path: unexpected {type(msg).__name__} (neither postcopy nor COLO "
                                      "is running)")
        except (ChannelError, StreamError) as e:
            if self._code is None:
                self._error = f"return path: {e}"
                log.warning("return_path_failed", error=str(e))
        finally:
            self._ended.set()
            with self._pong:
                self._pong.notify_all()
            if self._error is not None and self.on_broken is not None:
                self.on_broken()
