"""The prototype's priority formula and weighted choice."""
from collections import Counter
import random

import pytest

from sentinel_proxy.core import scoring


@pytest.mark.parametrize("missing, inconsistent, latency, healthy, expected", [
    (0, 0, 50, True, 130),
    (0, 0, 100, True, 125),
    (0, 0, 499.9, True, 125),
    (0, 0, 500, True, 120),
    (2, 3, 50, False, 100 - 20 - 15 + 10),
    (0, 0, 1000, False, 100),
])
def test_priority(missing, inconsistent, latency, healthy, expected):
    assert scoring.priority(missing, inconsistent, latency, healthy) == expected


def test_weights_match_the_prototype_example():
    assert scoring.weights([100, 120, 80]) == [30, 50, 10]
    assert scoring.weights([]) == []
    assert scoring.weights([5]) == [10]


def test_weighted_choice_boundaries():
    items = ["a", "b", "c"]
    assert scoring.weighted_choice(items, [30, 50, 10], lambda: 0.0) == "a"
    assert scoring.weighted_choice(items, [30, 50, 10], lambda: 30 / 90) == "b"
    assert scoring.weighted_choice(items, [30, 50, 10], lambda: 0.999999) == "c"
    with pytest.raises(ValueError):
        scoring.weighted_choice([], [], lambda: 0.5)


def test_weighted_choice_distribution():
    rng = random.Random(7)
    counts = Counter(scoring.weighted_choice(["a", "b", "c"], [30, 50, 10], rng.random) for _ in range(9000))
    assert abs(counts["a"] / 9000 - 1 / 3) < 0.03
    assert abs(counts["b"] / 9000 - 5 / 9) < 0.03
    assert abs(counts["c"] / 9000 - 1 / 9) < 0.03


def test_node_type_prefers_world_state_depth():
    assert scoring.node_type(1, "pruned") == "archiver"
    assert scoring.node_type(0, "") == "archiver"
    assert scoring.node_type(500, "archiver") == "pruned"
    assert scoring.node_type(None, "archiver") == "archiver"
    assert scoring.node_type(None, "") == ""


def test_lag_reason():
    assert scoring.lag_reason(90, 100, 10) is None
    assert "11 blocks behind" in scoring.lag_reason(89, 100, 10)
    assert scoring.lag_reason(100, 100, 0) is None


def test_majority_needs_a_strict_winner():
    assert scoring.majority(["a", "a", "b"]) == "a"
    assert scoring.majority(["a", "b"]) is None
    assert scoring.majority([]) is None
    assert scoring.majority([("1", "1")]) == ("1", "1")


def test_breaker_opens_on_consecutive_failures_and_closes_after_probes():
    breaker = scoring.CircuitBreaker(scoring.BreakerPolicy(consecutive_failures=3, cooldown=5.0, close_after=2))
    for _ in range(2):
        assert breaker.available(0.0)
        assert breaker.record(False, 0.0) is None
    assert breaker.record(False, 1.0) == "open"
    assert not breaker.available(5.9)
    assert breaker.available(6.0) and breaker.state == "half-open"
    breaker.begin()
    assert not breaker.available(6.0), "one probe at a time"
    assert breaker.record(True, 6.1) is None and breaker.available(6.1)
    breaker.begin()
    assert breaker.record(True, 6.2) == "closed"
    assert [state for _, state in breaker.transitions] == ["open", "half-open", "closed"]


def test_breaker_window_and_half_open_failure():
    breaker = scoring.CircuitBreaker(scoring.BreakerPolicy(consecutive_failures=99, window=10, window_failures=4,
                                                           cooldown=1.0))
    for ok in (False, True, False, True, True, True, True, True, True, True, True):  # oldest failure slides out
        breaker.record(ok, 0.0)
    assert breaker.state == "closed"
    for ok in (False, False, True, False):
        breaker.record(ok, 0.0)
    assert breaker.state == "closed", "3 failures within the last 10 calls"
    breaker.record(False, 0.0)
    assert breaker.state == "open", "4 failures within the last 10 calls"
    assert breaker.available(1.0)
    breaker.begin()
    assert breaker.record(False, 1.0) == "open" and not breaker.available(1.5)
    assert breaker.available(2.0)
    breaker.begin()
    breaker.abandon()
    assert breaker.available(2.0), "a cancelled probe frees the slot"


def test_success_resets_the_streak():
    breaker = scoring.CircuitBreaker(scoring.BreakerPolicy(consecutive_failures=3, window_failures=99))
    for ok in (False, False, True, False, False, True) * 5:
        breaker.record(ok, 0.0)
    assert breaker.state == "closed"
