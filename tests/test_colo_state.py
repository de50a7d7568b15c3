"""COLO's failover status on its own: QEMU's refusals and query-colo-status's reason mapping."""

from __future__ import annotations

import pytest

from mig_core.engine.colo.state import ColoState
from mig_core.errors import QMPError
from mig_core.schema.migration import COLOExitReason, COLOMode, FailoverStatus


def test_failover_requests_and_reasons():
    exits = []
    state = ColoState(lambda mode, reason: exits.append((mode, reason)))
    with pytest.raises(QMPError, match="^VM is not in COLO mode$"):
        state.lost_heartbeat(False)
    assert state.reason(True) is COLOExitReason.NONE
    state.lost_heartbeat(True)
    assert state.failover is FailoverStatus.REQUIRE
    with pytest.raises(QMPError, match="^COLO failover is already activated$"):
        state.lost_heartbeat(True)
    assert state.reason(True) is COLOExitReason.PROCESSING
    assert state.reason(False) is COLOExitReason.ERROR  # QEMU's quirk: a secondary mid-failover says error
    state.exited(COLOMode.SECONDARY)
    assert exits == [(COLOMode.SECONDARY, COLOExitReason.REQUEST)]
    assert state.cas(FailoverStatus.REQUIRE, FailoverStatus.COMPLETED)
    assert state.reason(False) is COLOExitReason.REQUEST
    state.begin(lambda: None, None)  # a new COLO run starts afresh
    assert state.failover is FailoverStatus.NONE
    state.exited(COLOMode.PRIMARY)
    assert exits[-1] == (COLOMode.PRIMARY, COLOExitReason.ERROR)
    assert not state.checkpoint_now("request")  # no primary runs
