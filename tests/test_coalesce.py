"""Single-flight bookkeeping, without I/O."""
import pytest
from twisted.internet import defer

from sentinel_proxy.proxy.coalesce import Entry, SingleFlight


def test_followers_get_the_leaders_answer_and_the_key_is_freed():
    flights = SingleFlight()
    assert flights.join(b"k") is None
    leader = flights.lead(b"k")
    first, second = flights.join(b"k"), flights.join(b"k")
    assert flights.coalesced == 2 and len(flights) == 1
    leader.resolve(Entry("result", b"42"))
    assert first.result == second.result == Entry("result", b"42")
    assert len(flights) == 0 and flights.join(b"k") is None


def test_a_failed_flight_fails_its_followers():
    flights = SingleFlight()
    leader = flights.lead(b"k")
    follower = flights.join(b"k")
    leader.fail(RuntimeError("all nodes failed"))
    failures = []
    follower.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    assert len(flights) == 0


def test_a_cancelled_follower_does_not_break_the_others():
    flights = SingleFlight()
    leader = flights.lead(b"k")
    gone, kept = flights.join(b"k"), flights.join(b"k")
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    gone.cancel()
    leader.resolve(Entry("missing"))
    assert kept.result == Entry("missing")


def test_a_new_leader_after_landing_is_independent():
    flights = SingleFlight()
    old = flights.lead(b"k")
    old.resolve(Entry("result", b"1"))
    new = flights.lead(b"k")
    waiter = flights.join(b"k")
    old.resolve(Entry("result", b"stale"))  # a late duplicate resolve must not touch the new flight
    assert not waiter.called
    new.resolve(Entry("result", b"2"))
    assert waiter.result == Entry("result", b"2")
    with pytest.raises(AttributeError):
        Entry("result").kind = "x"
