"""Pure backend priority and weighted selection: the Go prototype's rules (seed-behaviour.md).

Kept free of backend objects so the arithmetic can be checked against the prototype's worked
example without any state.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


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
