"""The dashboard's history: a sample of every node every :data:`HISTORY_INTERVAL` seconds, the last
:data:`HISTORY_SAMPLES` of them (an hour), and the timeline of routing transitions.

Memory is bounded: a fixed number of small tuples per node, and a node removed by a reload is
forgotten at the next sample. Latency is real traffic's: the answered attempts since the last
sample (at most the last ``LATENCY_WINDOW`` of them, what the pool keeps), not the health
check's. With --workers each worker samples what it knows: its own traffic, and the node state
the leader sends it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.ops.logs import observer
from sentinel_proxy.state.backends import Backend, BackendPool
from sentinel_proxy.state.events import Timeline
from sentinel_proxy.state.status import RequestTotals, traffic_note

log = Logger(observer=observer)

HISTORY_INTERVAL = 10.0
HISTORY_SAMPLES = 360


class Sample(NamedTuple):
    """One node at one moment; p50/p99 (ms) and the error rate are None without traffic."""

    at: float
    height: int
    lag: int
    p50: float | None
    p99: float | None
    error_rate: float | None
    requests: int
    #: ``Backend.routing``, or "breaker-open" for a routable node whose breaker is open.
    routing: str


class Traffic(NamedTuple):
    """The gateway's requests in one interval: the callers' errors (4xx) apart from the 5xx."""

    at: float
    requests: int
    caller_errors: int
    node_errors: int


@dataclass(slots=True)
class _Marks:
    """A node's counters at the last sample: the next one takes the differences."""

    answered: int
    requests: int
    errors: int


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank, as the hedge delay's p95 is taken."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class History:
    """The samples, and the document the dashboard draws them from."""

    def __init__(self, pool: BackendPool, totals: RequestTotals, clock: IReactorTime,
                 interval: float = HISTORY_INTERVAL, size: int = HISTORY_SAMPLES):
        self._pool = pool
        self._totals = totals
        self._clock = clock
        self.interval = interval
        self._size = size
        self.timeline = Timeline(clock)
        self._nodes: dict[str, deque[Sample]] = {}
        self._marks: dict[str, _Marks] = {}
        self._traffic: deque[Traffic] = deque(maxlen=size)
        self._traffic_marks = (totals.requests, totals.caller_errors, totals.node_errors)

    def sample(self) -> None:
        now = self._clock.seconds()
        names = set()
        for backend in self._pool.backends:
            names.add(backend.name)
            series = self._nodes.get(backend.name)
            if series is None:
                series = self._nodes[backend.name] = deque(maxlen=self._size)
            series.append(self._sample(backend, now))
        for name in set(self._nodes) - names:  # removed by a reload
            del self._nodes[name]
            self._marks.pop(name, None)
        totals = self._totals
        marks = (totals.requests, totals.caller_errors, totals.node_errors)
        self._traffic.append(Traffic(now, *(new - old for new, old in zip(marks, self._traffic_marks))))
        self._traffic_marks = marks

    def _sample(self, backend: Backend, now: float) -> Sample:
        marks = self._marks.get(backend.name)
        if marks is None:  # counted from the node's start: the first interval is since then
            marks = _Marks(0, 0, 0)
        answered = min(backend.answered - marks.answered, len(backend.answer_latency))
        ordered = sorted(list(backend.answer_latency)[-answered:]) if answered > 0 else []
        requests = backend.total_requests - marks.requests
        errors = backend.total_errors - marks.errors
        self._marks[backend.name] = _Marks(backend.answered, backend.total_requests, backend.total_errors)
        routing = backend.routing
        if routing in ("preferred", "fallback") and backend.breaker.state == "open":
            routing = "breaker-open"
        return Sample(round(now, 3), backend.block_number, backend.lag,
                      round(percentile(ordered, 0.5), 3) if ordered else None,
                      round(percentile(ordered, 0.99), 3) if ordered else None,
                      round(errors / requests, 4) if requests > 0 else None, requests, routing)

    def document(self) -> dict[str, Any]:
        """What ``/dashboard/history`` answers: series as columns (one list per field), oldest first."""
        nodes = []
        for backend in self._pool.backends:
            samples = self._nodes.get(backend.name, ())
            nodes.append({
                "name": backend.name,
                "routing": backend.routing,
                "note": traffic_note(backend, self.timeline),
                "series": {field: [getattr(s, field) for s in samples] for field in Sample._fields},
            })
        return {
            "interval": self.interval,
            "now": round(self._clock.seconds(), 3),
            "nodes": nodes,
            "traffic": {field: [getattr(t, field) for t in self._traffic] for field in Traffic._fields},
            "totals": self._totals.to_json(),
            "timeline": self.timeline.to_json(),
        }


class HistoryService(TimerService):
    """Samples every ``interval`` seconds from the start; a failed sample is logged and the next
    one comes (a TimerService whose call raises stops for good)."""

    def __init__(self, history: History, clock: IReactorTime):
        super().__init__(history.interval, self._sample)
        self.clock = clock
        self.history = history

    def _sample(self) -> None:
        try:
            self.history.sample()
        except Exception:
            log.failure("the dashboard's history sample failed; the next one comes in {interval} s",
                        interval=self.history.interval)
