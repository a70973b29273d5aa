"""Routing transitions of the nodes, and the bounded timeline the dashboard shows them on.

:class:`~sentinel_proxy.state.backends.BackendPool` works the transitions out from its own state
(so a --workers follower, which takes the leader's state whole, sees the same ones) and hands
each to whoever listens; the timeline stamps them with its clock. Pure: no I/O.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

#: Transitions kept: at a few a minute in a bad hour, the last hour or more.
TIMELINE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Transition:
    """One change in how a node is routed, in one sentence that names it."""

    node: str
    #: up, down, quarantined, recovered, diverged, agrees, drained, undrained, breaker
    kind: str
    text: str


class Timeline:
    """The last :data:`TIMELINE_SIZE` transitions, each with when it happened."""

    def __init__(self, clock: IReactorTime, size: int = TIMELINE_SIZE):
        self._clock = clock
        self._events: deque[tuple[float, Transition]] = deque(maxlen=size)

    def record(self, transition: Transition) -> None:
        self._events.append((self._clock.seconds(), transition))

    def since(self, node: str, kinds: frozenset[str]) -> float | None:
        """When ``node`` last made a transition of one of these kinds (None: not within the timeline)."""
        for at, transition in reversed(self._events):
            if transition.node == node and transition.kind in kinds:
                return at
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [{"at": round(at, 3), "node": t.node, "kind": t.kind, "text": t.text} for at, t in self._events]
