"""A failover asked of a COLO secondary while it loads a checkpoint waits for the load (QEMU's relaunch);
asked while it waits for the primary, it cuts the connection at once. Over a real socket pair."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from mig_core.engine.colo.secondary import ColoSecondary
from mig_core.engine.colo.state import ColoState
from mig_core.engine.return_path import DestinationReturnPath
from mig_core.ext.channel import SocketChannel
from mig_core.machine.machine import Machine
from mig_core.schema.migration import FailoverStatus


def _secondary() -> tuple[ColoSecondary, ColoState, SocketChannel, socket.socket]:
    mine, peer = socket.socketpair()
    channel = SocketChannel(mine)
    state = ColoState(lambda mode, reason: None)
    incoming = SimpleNamespace(ctx=None, machine=Machine(), status=None, channel=channel,
                               return_path=DestinationReturnPath(channel), reader=None)
    side = ColoSecondary(incoming, state)  # type: ignore[arg-type]
    state.begin(side._kick, None)
    return side, state, channel, peer


def test_a_failover_asked_while_loading_waits_for_the_load():
    side, state, channel, peer = _secondary()
    try:
        side._busy = True
        state.lost_heartbeat(True)
        assert state.failover is FailoverStatus.RELAUNCH  # retried once the checkpoint is in
        assert channel.abort_reason is None  # the load goes on undisturbed
        assert state.requested
    finally:
        channel.close()
        peer.close()


def test_a_failover_asked_while_waiting_cuts_the_connection_at_once():
    side, state, channel, peer = _secondary()
    try:
        state.lost_heartbeat(True)
        assert state.failover is FailoverStatus.REQUIRE
        assert channel.abort_reason == "COLO failover"
    finally:
        channel.close()
        peer.close()
