"""Single-flight bookkeeping, without I/O."""
import pytest
from twisted.internet import defer

from sentinel_proxy.proxy.coalesce import Entry, SharedCall, SingleFlight, Unanswered


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


# ------------------------------------------------------------------- a leader's caller leaving


def shared(flights: SingleFlight, cancelled: list | None = None) -> tuple[defer.Deferred, defer.Deferred]:
    """A flight for b"k" and its upstream call (a Deferred the test fires, noting its cancellation
    in ``cancelled``), as the cache stage starts them; and what the leader waits on."""
    running: defer.Deferred = defer.Deferred(None if cancelled is None else cancelled.append)
    return running, SharedCall(running, [flights.lead(b"k")]).leader()


def gone(waiter: defer.Deferred) -> defer.Deferred:
    waiter.addErrback(lambda f: f.trap(defer.CancelledError))
    waiter.cancel()
    return waiter


def test_the_call_goes_on_for_followers_when_the_leader_leaves(unhandled):
    flights = SingleFlight()
    running, leader = shared(flights)
    follower = flights.join(b"k")
    gone(leader)
    assert not running.called, "a follower still waits"
    flights._flights[b"k"].resolve(Entry("result", b"42"))
    running.callback("fetched")
    assert follower.result == Entry("result", b"42") and len(flights) == 0


def test_the_call_is_cancelled_when_the_last_one_waiting_leaves(unhandled):
    flights = SingleFlight()
    cancelled: list = []
    running, leader = shared(flights, cancelled)
    first, second = flights.join(b"k"), flights.join(b"k")
    gone(first)
    gone(leader)
    assert not cancelled, "one follower still waits"
    gone(second)
    assert cancelled == [running] and len(flights) == 0


def test_followers_left_unanswered_are_failed_not_forgotten(unhandled):
    flights = SingleFlight()
    running, leader = shared(flights)
    follower = flights.join(b"k")
    gone(leader)
    running.errback(RuntimeError("every node failed"))
    failures = []
    follower.addErrback(failures.append)
    assert failures and failures[0].check(Unanswered) and len(flights) == 0
    assert unhandled and "failed after its leader left" in unhandled[0]["log_format"]
    unhandled.clear()


def test_the_leader_gets_what_the_call_brings_and_no_flight_outlives_it():
    flights = SingleFlight()
    running, leader = shared(flights)
    follower = flights.join(b"k")
    running.callback("fetched, without an answer for the key")
    assert leader.result == "fetched, without an answer for the key"
    failures = []
    follower.addErrback(failures.append)
    assert failures[0].check(Unanswered) and flights.join(b"k") is None
