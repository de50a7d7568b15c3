"""The switch to postcopy on the source, and what follows: background pages, pause, recovery.

``run_postcopy`` (QEMU's postcopy_start, with mig's stream): end the multifd
channels, stop the machine, take the last dirty sync, name every page still to
be sent in POSTCOPY_RAM_DISCARD commands, send all device state in one package
that the destination reads whole, and move to ``postcopy-active``. Downtime ends
when the destination answers the package's PING: it loaded the devices and runs.
Then ``PostcopySender`` (source.py) sends the rest. A broken connection pauses
(``postcopy-paused``) until ``migrate resume=true`` connects again; the
handshake (RECV_BITMAP per block, POSTCOPY_RESUME, RESUME_ACK) tells the source
what the destination still lacks.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from mig_core.engine.context import EngineContext, StatusCell
from mig_core.engine.multifd_send import MultifdSender
from mig_core.engine.postcopy.ipc import SWITCH_INTERVAL_S
from mig_core.engine.postcopy.source import (
    PostcopySender,
    SourceEngine,
    send_discards,
    send_package,
    watch_downtime,
)
from mig_core.engine.return_path import ReceivedBitmap, ResumeAck, SourceReturnPath
from mig_core.engine.stats import now_ms
from mig_core.engine.switchover import SwitchoverEngine, report_completed, stop_machine
from mig_core.errors import MigrationFailed, QMPError, StreamError
from mig_core.ext.channel import Channel, ChannelError
from mig_core.memory.pagemap import union_pages
from mig_core.schema.common import RunState
from mig_core.schema.migration import MigrationCapability
from mig_core.schema.migration import MigrationStatus as S
from mig_core.stream.format import Command

if TYPE_CHECKING:
    from mig_core.ext.transport import Transport
    from mig_core.schema.migration import MigrationAddress

log = structlog.get_logger("mig.postcopy.switch")


class SwitchingEngine(SourceEngine, SwitchoverEngine, Protocol):
    """The outgoing migration as the switch to postcopy drives it."""

    ctx: EngineContext
    transport: Transport
    addr: MigrationAddress
    channel: Channel | None
    cancel_requested: threading.Event
    resume_requests: queue.Queue[tuple[Transport, MigrationAddress]]
    status: StatusCell
    multifd: MultifdSender | None
    postcopy: PostcopySender | None
    _unsent: dict[str, np.ndarray] | None
    _runstate_before: RunState | None

    @property
    def _ch(self) -> Channel: ...

    def _sync(self) -> dict[str, np.ndarray]: ...

    def _end_pass(self, running: bool) -> None: ...

    def use_connection(self, channel: Channel) -> None: ...


def _recoverable(engine: SwitchingEngine, e: Exception) -> bool:
    """A broken connection pauses; the destination's own failure, a cancel or a bug does not."""
    if engine.cancel_requested.is_set():
        return False
    if isinstance(e, ChannelError):
        return True
    rp = engine.return_path
    return isinstance(e, MigrationFailed) and rp is not None and rp.broken


def run_postcopy(engine: SwitchingEngine) -> None:
    """Switch to postcopy, send the rest, complete when the destination confirms the last page arrived."""
    c, status = engine.counters, engine.status
    assert engine._unsent is not None and engine.return_path is not None
    stop_machine(engine, postcopy=True)
    final = engine._sync()
    coming = {b.name: union_pages(engine._unsent[b.name], final[b.name], b.npages) for b in engine.machine.blocks}
    if engine.multifd is not None:  # the destination places everything they carried before it runs
        engine._end_pass(running=False)
        engine.multifd.finish()
    send_discards(engine, coming)
    token = c.dirty_sync_count + 1  # above every pass's PING token
    watch_downtime(engine.return_path, token, c)
    sender = engine.postcopy = PostcopySender(engine, coming, lambda: engine.ctx.parameter("max-postcopy-bandwidth"),
                                              engine.ctx.postcopy_prefetch_pages)
    engine.return_path.on_request = sender.on_request
    if engine.caps[MigrationCapability.POSTCOPY_PREEMPT]:  # the destination accepts it before it runs
        sender.use_preempt(engine.transport.connect_extra(engine.addr, engine.cancel_requested.is_set, False),
                           engine.machine.uuid)
    send_package(engine, token)
    engine._flush()
    engine._account(0, running=False)
    if sender.preempt is None:
        sender.use_main()
    c.in_postcopy = True
    engine._runstate_before = None  # the destination may run from now on: a failure never resumes here
    if sender.release:
        sender.release_migrated()
    if not status.cas(S.DEVICE, S.POSTCOPY_ACTIVE):
        engine._check_cancel()
    c.remaining = sender.remaining_bytes()
    log.info("postcopy_started", pages=sender.left, ms_since_stop=now_ms() - (c.downtime_start_ms or 0))
    # a page request waits for the GIL behind whatever thread holds it: up to the switch interval (5 ms
    # by default); a short one keeps fault latency low while the source has nothing else to run
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
    try:
        _send_rest(engine, sender)
    finally:
        sys.setswitchinterval(interval)
    report_completed(engine, S.POSTCOPY_ACTIVE, postcopy_requests=c.postcopy_requests,
                     prefetched_pages=sender.prefetched)


def _send_rest(engine: SwitchingEngine, sender: PostcopySender) -> None:
    """Background and requested pages until the destination confirms the end; pauses on a broken connection."""
    while True:
        try:
            sender.run()
            sender.finish()
            sender.close_preempt(end=True)
            engine.writer.write_end()
            engine._flush()
            engine._ch.finish()
            engine._account(0, running=False)
            rp = engine.return_path
            assert rp is not None
            rp.await_end(engine._check_cancel)
            break
        except (ChannelError, MigrationFailed) as e:
            if not _recoverable(engine, e):
                raise
            _pause_until_recovered(engine, sender, str(e))


#: How long a recovery's destination may take to answer the handshake before the source pauses again.
HANDSHAKE_TIMEOUT_S = 30.0


def _pause_until_recovered(engine: SwitchingEngine, sender: PostcopySender, error: str) -> None:
    """postcopy-paused until ``migrate resume=true`` connects and the handshake completes (then active)."""
    status = engine.status
    if sender.release:
        engine.ctx.set_error(f"postcopy: the connection to the destination broke ({error}); with release-ram this "
                             "source freed the pages it had sent, so it cannot resume the migration")
    else:
        engine.ctx.set_error(f"postcopy: the connection to the destination broke ({error}); it can resume only to "
                             "the same destination process (migrate-recover there, then migrate with resume): a "
                             "destination that died took the machine's state and the pages it had received with it")
    status.cas(status.state, S.POSTCOPY_PAUSED)
    log.warning("postcopy_paused", error=error, msg="Detected IO failure for postcopy. Migration paused.")
    sender.close_preempt(end=False)
    sender.direct = None  # its connection is gone; the recovery writes on the new one
    _drop_connection(engine)
    while True:
        transport, addr = _next_resume(engine)
        status.cas(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP)
        try:
            channel = transport.connect(addr, engine.cancel_requested.is_set)
        except (QMPError, ChannelError, OSError) as e:
            text = e.desc if isinstance(e, QMPError) else str(e)
            log.warning("postcopy_recover_connect_failed", error=text)
            engine.ctx.set_error(text)
            status.cas(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED)
            continue
        status.cas(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER)
        try:
            _handshake(engine, sender, channel, transport, addr)
        except (ChannelError, StreamError, MigrationFailed, TimeoutError, QMPError) as e:
            log.warning("postcopy_recover_failed", error=e.desc if isinstance(e, QMPError) else str(e))
            sender.close_preempt(end=False)
            _drop_connection(engine)
            status.cas(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)
            continue
        status.cas(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
        log.info("postcopy_recovered", pages_left=sender.left)
        return


def _next_resume(engine: SwitchingEngine) -> tuple[Transport, MigrationAddress]:
    while True:
        if engine.cancel_requested.is_set():
            raise MigrationFailed("the paused postcopy migration was abandoned")
        try:
            return engine.resume_requests.get(timeout=0.2)
        except queue.Empty:
            continue


def _drop_connection(engine: SwitchingEngine) -> None:
    """Close the broken connection and end its return-path thread (the pages sender keeps its state)."""
    ch, rp = engine.channel, engine.return_path
    if ch is not None:
        ch.abort("postcopy paused")
    if rp is not None:
        rp.wake()
        rp.join(5)
    if ch is not None:
        ch.close()


def _handshake(engine: SwitchingEngine, sender: PostcopySender, channel: Channel, transport: Transport,
               addr: MigrationAddress) -> None:
    """On the new connection: header, RECV_BITMAP per block, POSTCOPY_RESUME; RESUME_ACK ends it."""
    engine.use_connection(channel)
    writer = engine.writer
    writer.write_header(engine.machine.uuid)
    bitmaps: dict[str, np.ndarray] = {}
    acked = threading.Event()
    cond = threading.Condition()

    def on_recovery(msg: ReceivedBitmap | ResumeAck) -> None:
        with cond:
            if isinstance(msg, ResumeAck):
                if msg.value != 1:
                    raise StreamError(f"illegal resume_ack value {msg.value}")
                acked.set()
            else:
                block = sender.by_name.get(msg.block)
                if block is None:
                    raise StreamError(f"RECV_BITMAP for an unknown RAM block '{msg.block}'")
                expected = (block.npages + 7) // 8
                if len(msg.bitmap) != expected:
                    raise StreamError(f"ramblock '{msg.block}' bitmap size mismatch (0x{len(msg.bitmap):x} != "
                                      f"0x{expected:x})")
                bitmaps[msg.block] = np.unpackbits(np.frombuffer(msg.bitmap, np.uint8), count=block.npages
                                                   ).astype(bool)
            cond.notify_all()

    rp = SourceReturnPath(channel, lambda token: writer.write_command(Command.PING, token))
    rp.on_recovery = on_recovery
    engine.return_path = rp
    rp.start(ping=False)
    for b in engine.machine.blocks:
        writer.write_command(Command.POSTCOPY_RECV_BITMAP, b.name)
    engine._flush()
    _wait(cond, lambda: len(bitmaps) == len(sender.blocks), rp, engine)
    sender.reload(bitmaps)
    if engine.caps[MigrationCapability.POSTCOPY_PREEMPT]:  # a new preempt connection before the resume
        sender.use_preempt(transport.connect_extra(addr, engine.cancel_requested.is_set, False), engine.machine.uuid)
    if sender.preempt is None:
        sender.use_main()
    rp.on_request = sender.on_request
    writer.write_command(Command.POSTCOPY_RESUME)
    engine._flush()
    _wait(cond, acked.is_set, rp, engine)


def _wait(cond: threading.Condition, done: Callable[[], bool], rp: SourceReturnPath, engine: SwitchingEngine) -> None:
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    with cond:
        while not done():
            failure = rp.failure()
            if failure is not None or engine.cancel_requested.is_set():
                raise MigrationFailed(failure or "cancelled")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the destination did not answer the recovery within {HANDSHAKE_TIMEOUT_S:g} s")
            cond.wait(0.1)
