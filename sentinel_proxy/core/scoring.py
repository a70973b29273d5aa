"""Pure backend priority and weighted selection: the Go prototype's rules (seed-behaviour.md).

Kept free of backend objects so the arithmetic can be checked against the prototype's worked
example without any state.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


def priority(missing_epochs: int, inconsistent_epochs: int, avg_latency_ms: float, healthy: bool) -> int:
    """100 − 10·missing − 5·inconsistent + latency bonus (10 under 100 ms, 5 under 500 ms) + 20 if healthy."""
    score = 100 - 10 * missing_epochs - 5 * inconsistent_epochs
    if avg_latency_ms < 100:
        score += 10
    elif avg_latency_ms < 500:
        score += 5
    if healthy:
        score += 20
    return score


def weights(priorities: Sequence[int]) -> list[int]:
    """weight = max(1, priority − lowest priority + 10): the worst candidate keeps a small share.
    The prototype's floor of 1 never binds (no priority is below the lowest), so it is not computed."""
    if not priorities:
        return []
    base = 10 - min(priorities)
    return [p + base for p in priorities]


def weighted_choice(items: Sequence[T], item_weights: Sequence[int], random: Callable[[], float]) -> T:
    """Pick one item with probability proportional to its weight; ``random()`` is in [0, 1)."""
    if not items:
        raise ValueError("no items to choose from")
    total = sum(item_weights)
    target = random() * total
    running = 0
    for item, weight in zip(items, item_weights):
        running += weight
        if target < running:
            return item
    return items[-1]


#: ``oldestHistoricBlockNumber`` at or below this means the node keeps world state from genesis.
FULL_HISTORY_BLOCK = 1


def node_type(oldest_block: int | None, epoch_type: str) -> str:
    """Archiver or pruned: from the node's own world-state depth when it reports one.

    The prototype's epoch count (``epoch_type``, from the sentinel history) only says how long the
    node's validator sentinel has been recording; ``oldestHistoricBlockNumber`` says which old
    state the node can actually serve, so it wins whenever the node offers it.
    """
    if oldest_block is not None:
        return "archiver" if oldest_block <= FULL_HISTORY_BLOCK else "pruned"
    return epoch_type


def lag_reason(block: int, best: int, max_lag: int) -> str | None:
    """Why a node is held back for lagging, or None: more than ``max_lag`` blocks behind the best."""
    lag = best - block
    if lag > max_lag:
        return f"{lag} blocks behind the best healthy node ({best}); limit {max_lag}"
    return None


def majority(values: Iterable[H]) -> H | None:
    """The value held by more nodes than any other, or None on a tie (no side can be trusted)."""
    counts = Counter(values).most_common(2)
    if not counts:
        return None
    if len(counts) == 2 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a node's breaker opens and closes (eRPC's defaults: 20 failures in 80 calls, 8 to close)."""

    consecutive_failures: int = 5
    window: int = 80
    window_failures: int = 20
    cooldown: float = 5.0
    close_after: int = 8


class CircuitBreaker:
    """Passive outlier ejection fed by real traffic: pure state, the caller passes the time.

    Closed: every outcome goes into a sliding window; ``consecutive_failures`` in a row, or
    ``window_failures`` within the last ``window`` outcomes, open it at once. Open: no traffic
    until ``cooldown`` has passed. Half-open: one probe at a time; ``close_after`` successes in a
    row close it, one failure opens it again for another cool-down.
    """

    __slots__ = ("policy", "state", "opened_at", "_outcomes", "_failures", "_streak", "_probing", "_successes",
                 "transitions", "on_change")

    def __init__(self, policy: BreakerPolicy, on_change: Callable[[str], None] | None = None):
        self.policy = policy
        #: Told of every state change, including open -> half-open, which happens on a look-up.
        self.on_change = on_change
        self.state = CLOSED
        self.opened_at = 0.0
        self._outcomes: deque[bool] = deque(maxlen=policy.window)
        self._failures = 0
        self._streak = 0
        self._probing = False
        self._successes = 0
        #: (time, new state) of the recent transitions, newest last, for /health.
        self.transitions: deque[tuple[float, str]] = deque(maxlen=10)

    def _move(self, state: str, now: float) -> None:
        self.state = state
        self.transitions.append((now, state))
        if state == OPEN:
            self.opened_at = now
        self._probing = False
        self._successes = 0
        if state == CLOSED:
            self._outcomes.clear()
            self._failures = 0
            self._streak = 0
        if self.on_change is not None:
            self.on_change(state)

    def available(self, now: float) -> bool:
        """Whether a call may go to the node now (moving open -> half-open after the cool-down)."""
        if self.state == OPEN and now - self.opened_at >= self.policy.cooldown:
            self._move(HALF_OPEN, now)
        if self.state == HALF_OPEN:
            return not self._probing
        return self.state == CLOSED

    def begin(self) -> None:
        """A call is going out; in half-open it is the one probe."""
        if self.state == HALF_OPEN:
            self._probing = True

    def abandon(self) -> None:
        """A call was cancelled (it lost a hedge race): no outcome, but the probe slot is free again."""
        self._probing = False

    def record(self, ok: bool, now: float) -> str | None:
        """Feed one outcome; returns the new state when it changed."""
        before = self.state
        if self.state == HALF_OPEN:
            self._probing = False
            if not ok:
                self._move(OPEN, now)
            else:
                self._successes += 1
                if self._successes >= self.policy.close_after:
                    self._move(CLOSED, now)
        elif self.state == CLOSED:
            if len(self._outcomes) == self._outcomes.maxlen and not self._outcomes[0]:
                self._failures -= 1
            self._outcomes.append(ok)
            self._streak = 0 if ok else self._streak + 1
            self._failures += 0 if ok else 1
            if self._streak >= self.policy.consecutive_failures or self._failures >= self.policy.window_failures:
                self._move(OPEN, now)
        return self.state if self.state != before else None
