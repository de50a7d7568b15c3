"""The return path's typed messages and both of its ends, over an in-memory channel pair."""

from __future__ import annotations

import threading

import pytest

from mig_core.engine.return_path import (
    DestinationReturnPath,
    Loaded,
    Pong,
    ReceivedBitmap,
    RequestPages,
    ResumeAck,
    Shut,
    SourceReturnPath,
    SwitchoverAck,
    decode,
    encode,
)
from mig_core.errors import MigrationFailed, StreamError
from mig_core.ext.memory_channel import loopback_pair
from mig_core.stream.format import Command
from mig_core.stream.reader import CommandReceived

MESSAGES = [Pong(7), Loaded(), Shut(1), RequestPages("pc.ram", 4096, 8192), ReceivedBitmap("pc.ram", b"\x80\x01"),
            ResumeAck(1), SwitchoverAck()]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_its_encoding(msg):
    command, argument = encode(msg)
    assert decode(CommandReceived(command, argument)) == msg


@pytest.mark.parametrize(("command", "argument", "error"), [
    (Command.RP_PONG, "7", "return path: PONG needs a non-negative integer, got '7'"),
    (Command.RP_SHUT, -1, "return path: SHUT needs a non-negative integer, got -1"),
    (Command.RP_REQ_PAGES, ["pc.ram", 0], "return path: REQ_PAGES needs [block, offset, length], got ['pc.ram', 0]"),
    (Command.RP_RECV_BITMAP, 3, "return path: RECV_BITMAP needs [block, bitmap], got 3"),
    (Command.PING, 1, "return path: PING is not a return-path message"),
])
def test_malformed_messages_are_refused_by_name(command, argument, error):
    with pytest.raises(StreamError) as e:
        decode(CommandReceived(command, argument))
    assert str(e.value) == error


def ends():
    """A source end reading what a destination end writes; the source's PINGs are answered by the test."""
    src_ch, dst_ch = loopback_pair()
    pings: list[int] = []
    source = SourceReturnPath(src_ch, pings.append)
    return source, DestinationReturnPath(dst_ch), pings, (src_ch, dst_ch)


def test_pong_releases_the_ping_and_loaded_ends_the_load():
    source, dest, pings, channels = ends()
    source.start()
    dest.send(Pong(0))
    waiter = threading.Thread(target=lambda: source.ping(5, lambda: None))
    waiter.start()
    dest.send(Pong(5))
    waiter.join(30)
    assert not waiter.is_alive() and pings == [0, 5]
    assert source.failure() is None
    dest.send(Loaded())
    source.await_end(lambda: None)  # returns: the destination loaded everything
    source.join(30)
    for ch in channels:
        ch.close()


def test_a_failed_destination_and_an_unexpected_page_request_end_the_migration():
    source, dest, _pings, channels = ends()
    source.start()
    dest.send(Shut(1))
    with pytest.raises(MigrationFailed, match="Sibling indicated error 1"):
        source.await_end(lambda: None)
    for ch in channels:
        ch.close()
    source, dest, _pings, channels = ends()
    source.start()
    dest.send(RequestPages("pc.ram", 0, 4096))
    with pytest.raises(MigrationFailed,
                       match=r"return path: unexpected RequestPages \(neither postcopy nor COLO is running\)"):
        source.await_end(lambda: None)
    for ch in channels:
        ch.close()
