"""Pure backend priority and weighted selection: the Go prototype's rules (seed-behaviour.md).

Kept free of backend objects so the arithmetic can be checked against the prototype's worked
example without any state.
"""
from __future__ import annotations

from collections import Counter
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
    """weight = max(1, priority − lowest priority + 10): the worst candidate keeps a small share."""
    if not priorities:
        return []
    lowest = min(priorities)
    return [max(1, p - lowest + 10) for p in priorities]


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
