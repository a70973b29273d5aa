"""Backend state and the pool: the single source of truth for every node's state.

Background checks write here; the request path only reads (``pick``) and reports outcomes
(``record_request``). Priorities are recomputed when state changes, not per request, so picking
stays cheap.
"""
from __future__ import annotations

import base64
import random as _random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from . import scoring

if TYPE_CHECKING:
    from .integrity import IntegrityVerdict

#: Routes and the node type each one requires ("" = any type).
ROUTES: dict[str, str] = {"/": "", "/archiver": "archiver", "/pruned": "pruned"}

LATENCY_WINDOW = 100


class LatencyWindow:
    """The last ``LATENCY_WINDOW`` latencies (ms), as the prototype keeps them, with O(1) average."""

    __slots__ = ("_samples", "_total")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._total = 0.0

    def add(self, latency_ms: float) -> None:
        if len(self._samples) == self._samples.maxlen:
            self._total -= self._samples[0]
        self._samples.append(latency_ms)
        self._total += latency_ms

    @property
    def average(self) -> float:
        return self._total / len(self._samples) if self._samples else 0.0

    @property
    def minimum(self) -> float:
        return min(self._samples) if self._samples else 0.0

    @property
    def maximum(self) -> float:
        return max(self._samples) if self._samples else 0.0


def display_url(url: str) -> str:
    """The URL with any password masked: /health, metrics and logs must not leak credentials."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _target(url: str) -> tuple[bytes, bytes | None]:
    """Where requests go (path rewritten to the backend's own path, or ``/``) and Basic auth."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", "", "")).encode("ascii")
    auth = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        auth = b"Basic " + base64.b64encode(credentials)
    return target, auth


@dataclass(eq=False)
class Backend:
    url: str
    name: str = ""
    target: bytes = field(init=False, repr=False)
    authorization: bytes | None = field(init=False, repr=False)
    healthy: bool = False
    block_number: int = 0
    last_check: float | None = None
    last_error: str | None = None
    node_type: str = ""
    verdict: IntegrityVerdict | None = None
    latency: LatencyWindow = field(default_factory=LatencyWindow, repr=False)
    total_requests: int = 0
    total_errors: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        self.name = self.name or display_url(self.url)
        self.target, self.authorization = _target(self.url)
        self.rescore()

    def rescore(self) -> None:
        missing = len(self.verdict.missing_epochs) if self.verdict else 0
        inconsistent = len(self.verdict.inconsistent_epochs) if self.verdict else 0
        self.priority = scoring.priority(missing, inconsistent, self.latency.average, self.healthy)

    @property
    def checked_down(self) -> bool:
        """Known to be down: checked at least once and failed (not merely unchecked)."""
        return self.last_check is not None and not self.healthy


class BackendPool:
    """All backends, with selection per route; mutated only by checks and request outcomes."""

    def __init__(self, urls: Iterable[str], random: Callable[[], float] = _random.random):
        self._random = random
        self.backends: tuple[Backend, ...] = tuple(Backend(url) for url in urls)

    def replace(self, urls: Iterable[str]) -> None:
        """Set the backend list, keeping the state of nodes that stay."""
        current = {b.url: b for b in self.backends}
        self.backends = tuple(current.get(url) or Backend(url) for url in urls)

    def candidates(self, route: str) -> list[Backend]:
        wanted = ROUTES[route]
        return [b for b in self.backends if b.healthy and (not wanted or b.node_type == wanted)]

    def pick(self, route: str) -> Backend | None:
        """The prototype's weighted random choice among the route's healthy candidates."""
        candidates = self.candidates(route)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return scoring.weighted_choice(
            candidates, scoring.weights([b.priority for b in candidates]), self._random)

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def record_health(self, backend: Backend, healthy: bool, now: float, block_number: int | None = None,
                      latency_ms: float | None = None, error: str | None = None) -> None:
        backend.healthy = healthy
        backend.last_check = now
        backend.last_error = error
        if block_number is not None:
            backend.block_number = block_number
        if latency_ms is not None:
            backend.latency.add(latency_ms)
        backend.rescore()

    def record_integrity(self, backend: Backend, verdict: IntegrityVerdict) -> None:
        backend.verdict = verdict
        backend.node_type = verdict.node_type
        backend.rescore()

    @staticmethod
    def record_request(backend: Backend, ok: bool) -> None:
        backend.total_requests += 1
        if not ok:
            backend.total_errors += 1
