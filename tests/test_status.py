"""The MigrationStatus machine: transition tables, races, events and hooks."""

from __future__ import annotations

import threading

import pytest

from mig_core.control.manager import MigrationManager
from mig_core.control.status import DESTINATION_TRANSITIONS, SOURCE_TRANSITIONS, IllegalTransition, Side, StatusMachine
from mig_core.plugin.hookspecs import hookimpl
from mig_core.qapi import from_qmp
from mig_core.schema.commands import MigrateSetCapabilitiesArgs
from mig_core.schema.migration import MigrationStatus as S

# Event sequences of the facts file (§3.8), mapped onto the 9.1 states.
SOURCE_SEQUENCES = [
    [S.SETUP, S.ACTIVE, S.DEVICE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED],
    [S.SETUP, S.WAIT_UNPLUG, S.ACTIVE, S.DEVICE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_ACTIVE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
     S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.CANCELLING, S.CANCELLED],
    [S.SETUP, S.CANCELLING, S.CANCELLED],
    [S.SETUP, S.ACTIVE, S.DEVICE, S.COLO, S.COMPLETED],
    [S.SETUP, S.FAILED, S.SETUP, S.ACTIVE, S.FAILED],
    [S.SETUP, S.ACTIVE, S.COMPLETED],  # background snapshot
    [S.SETUP, S.COMPLETED],  # snapshot-save
]
DESTINATION_SEQUENCES = [
    [S.SETUP, S.ACTIVE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.COLO, S.COMPLETED],
    [S.SETUP, S.ACTIVE, S.FAILED],
]


def run_sequence(side, seq):
    seen = []
    m = StatusMachine(side, lambda _side, old, new: seen.append((old, new)))
    old = S.NONE
    for new in seq:
        assert m.cas(old, new)
        old = new
    return seen


@pytest.mark.parametrize("seq", SOURCE_SEQUENCES)
def test_source_sequences(seq):
    assert [n for _, n in run_sequence(Side.SOURCE, seq)] == seq


@pytest.mark.parametrize("seq", DESTINATION_SEQUENCES)
def test_destination_sequences(seq):
    assert [n for _, n in run_sequence(Side.DESTINATION, seq)] == seq


@pytest.mark.parametrize("side,table", [(Side.SOURCE, SOURCE_TRANSITIONS), (Side.DESTINATION, DESTINATION_TRANSITIONS)])
def test_every_illegal_transition_raises(side, table):
    for old in S:
        for new in S:
            m = StatusMachine(side)
            m._state = old  # put the machine at each state to probe its exits
            if new in table.get(old, ()):
                assert m.cas(old, new)
            else:
                with pytest.raises(IllegalTransition):
                    m.cas(old, new)
                assert m.state is old


def test_tables_cover_only_9_1_states():
    for table in (SOURCE_TRANSITIONS, DESTINATION_TRANSITIONS):
        for old, news in table.items():
            assert isinstance(old, S) and all(isinstance(n, S) for n in news)
    assert "postcopy-device" not in {s.value for s in S}
    # a destination never cancels; the source's postcopy cannot be cancelled
    assert S.CANCELLING not in {n for v in DESTINATION_TRANSITIONS.values() for n in v}
    assert S.CANCELLING not in SOURCE_TRANSITIONS[S.POSTCOPY_ACTIVE]


def test_lost_race_is_skipped_without_event():
    seen = []
    m = StatusMachine(Side.SOURCE, lambda *a: seen.append(a))
    assert m.cas(S.NONE, S.SETUP) and m.cas(S.SETUP, S.ACTIVE)
    assert m.cas(S.ACTIVE, S.CANCELLING)  # migrate_cancel wins
    assert not m.cas(S.ACTIVE, S.DEVICE)  # the migration thread's change is dropped silently
    assert m.state is S.CANCELLING and len(seen) == 3


def test_concurrent_cas_exactly_one_wins():
    m = StatusMachine(Side.SOURCE)
    m.cas(S.NONE, S.SETUP)
    m.cas(S.SETUP, S.ACTIVE)
    wins = []
    barrier = threading.Barrier(8)

    def racer(target):
        barrier.wait()
        if m.cas(S.ACTIVE, target):
            wins.append(target)

    threads = [threading.Thread(target=racer, args=(t,)) for t in [S.CANCELLING, S.DEVICE] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and m.state is wins[0]


def test_events_only_with_capability_hook_always():
    m = MigrationManager()
    events, hooks = [], []
    m.events.subscribe(events.append)

    class Recorder:
        @hookimpl
        def mig_status_changed(self, side, old, new, migration_id):
            hooks.append((side, old, new))

    m.hooks.register(Recorder())
    m.source.cas(S.NONE, S.SETUP)
    assert events == [] and hooks == [(Side.SOURCE, S.NONE, S.SETUP)]
    m.source.cas(S.SETUP, S.FAILED)
    m.migrate_set_capabilities(from_qmp(MigrateSetCapabilitiesArgs,
                                        {"capabilities": [{"capability": "events", "state": True}]}))
    m.source.cas(S.FAILED, S.SETUP)
    m.destination.cas(S.NONE, S.SETUP)
    assert [e["data"] for e in events] == [{"status": "setup"}, {"status": "setup"}]
    assert all(e["event"] == "MIGRATION" and set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)
    assert len(hooks) == 4 and hooks[-1] == (Side.DESTINATION, S.NONE, S.SETUP)


def test_migrate_cancel_semantics():
    m = MigrationManager()
    stopped = []
    m.cancel_outgoing = lambda: stopped.append(True)
    m.migrate_cancel()  # nothing runs: no-op
    assert m.source.state is S.NONE and stopped == []
    m.source.cas(S.NONE, S.SETUP)
    m.source.cas(S.SETUP, S.ACTIVE)
    m.migrate_cancel()
    assert m.source.state is S.CANCELLING and stopped == [True]
    m.migrate_cancel()  # already cancelling: nothing more
    assert stopped == [True]
    m.source.cas(S.CANCELLING, S.CANCELLED)
    for seq in ([S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_ACTIVE],):
        old = S.CANCELLED
        for new in seq:
            m.source.cas(old, new)
            old = new
    from mig_core.errors import QMPError

    with pytest.raises(QMPError, match=r"^Postcopy migration in progress, cannot cancel\.$"):
        m.migrate_cancel()
    assert m.source.state is S.POSTCOPY_ACTIVE


def test_wait_for():
    m = StatusMachine(Side.DESTINATION)
    threading.Timer(0.05, lambda: (m.cas(S.NONE, S.SETUP), m.cas(S.SETUP, S.ACTIVE))).start()
    assert m.wait_for({S.ACTIVE}, timeout=5)
    assert not m.wait_for({S.COMPLETED}, timeout=0.05)


def test_a_misspelt_hook_is_refused_when_registered():
    from mig_core.control.manager import MigrationManager
    from mig_core.plugin.hooks import HookValidationError

    class Typo:
        @hookimpl
        def mig_swichover(self, migration_id, side):  # the hookspec is mig_switchover
            pass

    m = MigrationManager()
    with pytest.raises(HookValidationError, match="unknown hook 'mig_swichover'.*mig_switchover"):
        m.hooks.register(Typo())
    assert not [p for p in m.pm.get_plugins() if isinstance(p, Typo)]  # nothing of it stays
    m.machine.close()
