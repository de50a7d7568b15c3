"""The comparison on its own: order of release, divergence, what a checkpoint carries, the bound, failover."""

from __future__ import annotations

from mig_colo import ColoCompare

from mig_core.ext.replication import Role


def _compare(limit: int = 100) -> tuple[ColoCompare, list[bytes], list[str]]:
    out: list[bytes] = []
    asked: list[str] = []
    return ColoCompare(Role.PRIMARY, out.extend, asked.append, limit), out, asked


def test_matches_release_in_order_whichever_side_comes_first():
    c, out, asked = _compare()
    c.output(b"1")
    c.output(b"2")
    assert out == [] and c.held() == [b"1", b"2"]
    c.peer_output(b"1")
    assert out == [b"1"]
    c.peer_output(b"2")
    c.peer_output(b"3")  # the secondary ahead: waits for the primary's
    assert out == [b"1", b"2"]
    c.output(b"3")
    assert out == [b"1", b"2", b"3"] and asked == []
    s = c.stats()
    assert (s.matched, s.mismatches, s.queue_depth, s.max_queue_depth) == (3, 0, 0, 2)


def test_a_divergence_holds_everything_after_it_until_the_checkpoint_is_loaded():
    c, out, asked = _compare()
    c.output(b"1")
    c.peer_output(b"x")
    assert asked == ["mismatch"] and out == []
    c.output(b"2")
    c.peer_output(b"2")  # equal, but after the divergence: no longer comparable
    assert out == [] and c.held() == [b"1", b"2"]
    c.checkpoint_started()
    assert c.held() == [b"1", b"2"]  # what the checkpoint carries
    c.output(b"3")  # the primary runs again before the secondary loaded it
    c.peer_output(b"3")  # the resumed secondary's: compared only once the checkpoint is loaded
    assert out == []
    c.checkpoint_done()
    assert out == [b"1", b"2", b"3"] and c.held() == []
    assert c.stats().released_unmatched == 2 and c.stats().mismatches == 1


def test_the_secondarys_output_before_a_checkpoint_no_longer_counts():
    c, out, _ = _compare()
    c.peer_output(b"old")
    c.checkpoint_started()
    c.checkpoint_done()
    c.output(b"new")
    c.peer_output(b"new")
    assert out == [b"new"] and c.stats().mismatches == 0


def test_a_full_queue_asks_for_a_checkpoint():
    c, out, asked = _compare(limit=3)
    for p in (b"1", b"2", b"3"):
        c.output(p)
    assert asked == ["queue-full"] and c.stats().queue_full == 1
    ahead, _, asked_ahead = _compare(limit=3)
    for p in (b"a", b"b", b"c", b"d"):  # a secondary far ahead counts too
        ahead.peer_output(p)
    assert asked_ahead == ["queue-full"]


def test_failover_releases_what_is_held_then_everything_at_once():
    c, out, _ = _compare()
    c.output(b"1")
    c.output(b"2")
    c.failover()
    assert out == [b"1", b"2"]
    c.output(b"3")
    c.peer_output(b"ignored")
    assert out == [b"1", b"2", b"3"]
