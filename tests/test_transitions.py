"""Routing transitions: each is one log event with named fields (once, not every round), and a line
on the timeline; the fallback warning waits for the first integrity verdicts (no WARN at a start)."""
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent

from sentinel_proxy.core.agreement import Divergence
from sentinel_proxy.core.scoring import BreakerPolicy
from sentinel_proxy.state.backends import BackendPool
from sentinel_proxy.state.events import Timeline, Transition
from sentinel_proxy.state.status import traffic_note
from tests.stages_support import CHAIN, Verdict


def transitions(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("transition") == kind and e.get("log_namespace") == "sentinel_proxy.state.backends"]


def fleet(clock: task.Clock, count: int = 3) -> tuple[BackendPool, Timeline]:
    pool = BackendPool([(f"pr{i}", f"http://n{i}:1") for i in range(count)], max_block_lag=10)
    timeline = Timeline(clock)
    pool.on_transition = timeline.record
    for backend in pool.backends:
        pool.record_health(backend, True, clock.seconds(), block_number=100, chain=CHAIN)
        pool.record_integrity(backend, Verdict())
    pool.reassess()
    return pool, timeline


def test_a_lagging_node_is_quarantined_once_then_recovers(logged):
    clock = task.Clock()
    clock.advance(1000.0)
    pool, timeline = fleet(clock)
    laggard = pool.backends[2]
    clock.advance(10.0)
    for _ in range(3):  # three rounds behind: one event
        pool.record_health(laggard, True, clock.seconds(), block_number=88, chain=CHAIN)
        pool.reassess()
    (event,) = transitions(logged, "quarantined")
    assert event["log_level"] == LogLevel.info and event["backend"] == "pr2" and event["kinds"] == ["lag"]
    assert event["reason"].startswith("12 blocks behind")
    note = traffic_note(laggard, timeline)
    assert note == {"text": "no traffic: quarantined: " + laggard.quarantine["lag"], "since": 1010.0}
    clock.advance(10.0)
    pool.record_health(laggard, True, clock.seconds(), block_number=100, chain=CHAIN)
    pool.reassess()
    (back,) = transitions(logged, "recovered")
    assert back["backend"] == "pr2" and back["kinds"] == ["lag"]
    texts = [(e["at"], e["kind"], e["text"]) for e in timeline.to_json() if e["node"] == "pr2"]
    assert texts == [(1000.0, "up", "pr2 up at block 100"),
                     (1010.0, "quarantined", f"pr2 quarantined: {event['reason']}"),
                     (1020.0, "recovered", "pr2 recovered: lag quarantine lifted")]
    assert traffic_note(laggard, timeline) is None


def test_another_chain_is_a_warning(logged):
    clock = task.Clock()
    pool, _ = fleet(clock)
    pool.record_health(pool.backends[0], True, 0.0, block_number=100, chain=("1", "9"))
    pool.reassess()
    (event,) = transitions(logged, "quarantined")
    assert event["log_level"] == LogLevel.warn and event["kinds"] == ["chain"]


def test_a_node_that_goes_down_is_not_said_to_recover(logged):
    clock = task.Clock()
    pool, timeline = fleet(clock)
    laggard = pool.backends[1]
    pool.record_health(laggard, True, 0.0, block_number=50, chain=CHAIN)
    pool.reassess()
    pool.record_health(laggard, False, 5.0, error="connection refused")
    pool.reassess()
    assert transitions(logged, "recovered") == []
    assert [e["text"] for e in timeline.to_json()][-1] == "pr1 down: connection refused"
    assert traffic_note(laggard, timeline)["text"] == "no traffic: down (connection refused)"


def test_drains_divergence_and_breakers_reach_the_timeline(logged):
    clock = task.Clock()
    pool, timeline = fleet(clock)
    node = pool.backends[0]
    pool.drain(node, True)
    pool.drain(node, False)
    assert [(e["transition"], e["action"]) for e in logged if "transition" in e and e.get("action")] == [
        ("drained", "drained"), ("undrained", "undrained")]
    assert formatEvent(transitions(logged, "drained")[0]) == "backend pr0 drained by an operator"
    node.divergence = Divergence("hash", 90, "0xaa", "0xbb", 2, 3, "finalized tip")
    pool.record_integrity(node, Verdict())
    pool.record_integrity(node, Verdict())
    (diverged,) = transitions(logged, "diverged")
    assert diverged["log_level"] == LogLevel.warn and (diverged["height"], diverged["hash"]) == (90, "0xaa")
    node.divergence = None
    pool.record_integrity(node, Verdict())
    assert len(transitions(logged, "agrees")) == 1
    pool.set_breaker_policy(BreakerPolicy(consecutive_failures=1, cooldown=30.0))
    clock.advance(100.0)
    pool.record_outcome(node, clock.seconds(), attempt="failed")
    assert [e["kind"] for e in timeline.to_json()][-1] == "breaker"
    assert timeline.to_json()[-1]["text"] == "pr0 circuit breaker open"
    assert traffic_note(node, timeline) == {"text": "no traffic: circuit breaker open", "since": 100.0}


def test_fallback_waits_for_every_first_verdict_before_warning(logged):
    pool = BackendPool([("a", "http://a:1"), ("b", "http://b:1")])
    for backend in pool.backends:
        pool.record_health(backend, True, 0.0, block_number=100, chain=CHAIN)
    pool.reassess()
    a, b = pool.backends
    pool.record_integrity(a, Verdict(status="bad", score=80))  # the first verdict, alone
    assert not [e for e in logged if "route" in e]
    timeline = Timeline(task.Clock())
    assert traffic_note(b, timeline)["text"].startswith("fallback: integrity not checked yet")
    pool.record_integrity(b, Verdict(status="unverified", score=0))
    warned = [e for e in logged if "route" in e]
    assert all(e["log_level"] == LogLevel.warn for e in warned)
    assert sorted(e["route"] for e in warned) == ["/", "/pruned"], "once per route, now that every node is judged"
    assert traffic_note(a, timeline)["text"] == ("fallback: integrity 'bad' (score 80); traffic only when no trusted "
                                                 "node can take it")


def test_the_timeline_is_bounded():
    timeline = Timeline(task.Clock(), size=4)
    for i in range(10):
        timeline.record(Transition("n", "up", str(i)))
    assert [e["text"] for e in timeline.to_json()] == ["6", "7", "8", "9"]
    assert timeline.since("n", frozenset({"down"})) is None
