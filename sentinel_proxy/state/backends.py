"""Backend state and the pool: the single source of truth for every node's state.

Background checks write here; the request path only reads (``pick``) and reports outcomes
(``record_outcome``). Priorities are recomputed when state changes, not per request, so picking
stays cheap.
"""
from __future__ import annotations

import base64
import random as _random
from functools import partial
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Sequence, Tuple, Union
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.logger import Logger, LogLevel

from sentinel_proxy.core import agreement, scoring
from sentinel_proxy.core.cache_policy import finalized_tip
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.state.events import Transition

if TYPE_CHECKING:
    from sentinel_proxy.core.integrity import IntegrityVerdict

#: Routes and the node type each one requires ("" = any type).
ROUTES: dict[str, str] = {"/": "", "/archiver": "archiver", "/pruned": "pruned"}

LATENCY_WINDOW = 100

log = Logger(observer=observer)


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
    def samples(self) -> list[float]:
        """The window, oldest first: what another gateway needs to rebuild it (fleet/codec.py)."""
        return list(self._samples)

    @property
    def minimum(self) -> float:
        return min(self._samples) if self._samples else 0.0

    @property
    def maximum(self) -> float:
        return max(self._samples) if self._samples else 0.0


def display_url(url: str) -> str:
    """``scheme://host:port``: all of a node's URL that may be shown anywhere. Userinfo, path and
    query are where node credentials live (``user:pass@``, ``TOKEN@``, ``/v1/APIKEY``, ``?key=``),
    so none of them is ever shown, not even masked."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{host}:{port}"


def display_names(entries: Sequence[tuple[str, str]]) -> list[str]:
    """Each node's display name: its configured name (``name=URL``), else its :func:`display_url`.

    Nodes behind one ``scheme://host:port`` (different path keys or users) would share a display
    URL: the first of them in the configured order keeps it, the next become ``#2``, ``#3``... A
    suffix drawn from the hidden parts (a hash of the URL) would leak them to anyone who can guess.
    Configured names cannot clash with these: they hold no ``:`` or ``#``.
    """
    names = []
    seen: dict[str, int] = {}
    for name, url in entries:
        if name:
            names.append(name)
            continue
        shown = display_url(url)
        seen[shown] = seen.get(shown, 0) + 1
        names.append(shown if seen[shown] == 1 else f"{shown}#{seen[shown]}")
    return names


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


#: Integrity statuses whose nodes get traffic first; the others ("bad", "unverified", not yet
#: checked) only when no node with one of these is eligible on the route.
TRUSTED_STATUSES = frozenset({"perfect", "good"})


BackendEntry = Union[str, Tuple[str, str]]


@dataclass(frozen=True, slots=True)
class TipsReport:
    """How the node's chain tips arrived in its last health round (shown in /health)."""

    #: The method that answered, or the remembered one that failed; None while none is known.
    method: str | None
    ok: bool
    error: str | None = None


@dataclass(eq=False)
class Backend:
    #: The URL as configured, credentials included: only :func:`_target` reads it (and the pool, to
    #: match nodes across reloads and workers). Never shown, not even in a repr.
    url: str = field(repr=False)
    #: The display name (:func:`display_names`): the only way the node is named anywhere, in
    #: headers, logs, /metrics, /health, the dashboard and /admin.
    name: str = ""
    target: bytes = field(init=False, repr=False)
    authorization: bytes | None = field(init=False, repr=False)
    healthy: bool = False
    block_number: int = 0
    last_check: float | None = None
    last_error: str | None = None
    node_type: str = ""
    verdict: IntegrityVerdict | None = None
    #: (l1ChainId, rollupVersion) as the node reports them; None until known.
    chain: tuple[str, str] | None = None
    #: The node's ``x-aztec-l2ProtocolContractsHash`` header (None: not known, or an older node that
    #: sends none). Part of the chain identity in cache keys, not of the chain quarantine.
    protocol_contracts: str | None = None
    #: ``oldestHistoricBlockNumber``: the oldest block whose state the node still serves.
    oldest_block: int | None = None
    lag: int = 0
    #: The node's last tips answer (``node_getL2Tips`` or ``getChainTips``): its vote for the
    #: finalized tip. None when its last health round brought none.
    tips: Any = None
    #: How the tips arrived last round (None before the first round that asked).
    tips_report: TipsReport | None = None
    #: The tips method this node answers, remembered by the health check (None: detect it).
    tips_method: str | None = None
    #: (n, archive root after block n) from the last health round, when it was asked for one.
    archive: tuple[int, str] | None = None
    #: Why the node is held to be on another chain than the majority (sticky, see core/agreement.py).
    divergence: agreement.Divergence | None = None
    #: Why the node gets no traffic although it is healthy: reason kind -> explanation.
    quarantine: dict[str, str] = field(default_factory=dict)
    #: Set by an operator (/admin/drain): no new traffic; requests in flight finish.
    drained: bool = False
    latency: LatencyWindow = field(default_factory=LatencyWindow, repr=False)
    #: Latencies (ms) of recent successful requests: the hedge delay is their p95.
    answer_latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    breaker: scoring.CircuitBreaker = field(default_factory=lambda: scoring.CircuitBreaker(scoring.BreakerPolicy()),
                                            repr=False)
    total_requests: int = 0
    total_errors: int = 0
    #: Attempts answered: how many of ``answer_latency`` are new since a history sample.
    answered: int = 0
    priority: int = 0

    def __post_init__(self) -> None:
        self.name = self.name or display_url(self.url)
        self.target, self.authorization = _target(self.url)
        self.rescore()

    def rescore(self) -> None:
        missing = len(self.verdict.missing_epochs) if self.verdict else 0
        inconsistent = len(self.verdict.inconsistent_epochs) if self.verdict else 0
        self.priority = scoring.priority(missing, inconsistent, self.latency.average, self.healthy)
        self.node_type = scoring.node_type(self.oldest_block, self.verdict.node_type if self.verdict else "")

    @property
    def label(self) -> str:
        """The metric label and /health's ``url``: the display name as well (the prototype put the
        URL there, credentials and all)."""
        return self.name

    @property
    def checked_down(self) -> bool:
        """Known to be down: checked at least once and failed (not merely unchecked)."""
        return self.last_check is not None and not self.healthy

    @property
    def eligible(self) -> bool:
        return self.healthy and not self.quarantine and not self.drained

    @property
    def trusted(self) -> bool:
        return self.verdict is not None and self.verdict.status in TRUSTED_STATUSES

    @property
    def routing(self) -> str:
        """How the request path treats the node, for /health."""
        if self.drained:
            return "drained"
        if not self.healthy:
            return "down"
        if self.quarantine:
            return "quarantined"
        return "preferred" if self.trusted else "fallback"

    def p95_latency(self, minimum_samples: int = 20) -> float | None:
        """p95 of recent answer latencies in ms, once there are enough samples to mean something."""
        if len(self.answer_latency) < minimum_samples:
            return None
        ordered = sorted(self.answer_latency)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]

    def keeps(self, block: int | None) -> bool:
        """Whether the node can answer about ``block`` (unknown depth counts as yes)."""
        return block is None or self.oldest_block is None or self.oldest_block <= block


def _backends(entries: Iterable[BackendEntry]) -> list[Backend]:
    """URLs, or (name, URL) pairs whose empty name means the default, named by :func:`display_names`."""
    pairs = [("", entry) if isinstance(entry, str) else entry for entry in entries]
    return [Backend(url, name) for (_, url), name in zip(pairs, display_names(pairs))]


@dataclass(frozen=True, slots=True)
class _View:
    """How a node was routed at the pool's last rebuild: its transitions are the differences."""

    #: None until the first health check.
    healthy: bool | None
    #: Quarantine kinds but "diverged": a divergence is a transition of its own.
    quarantine: frozenset[str]
    divergence: agreement.Divergence | None
    drained: bool


_UNSEEN = _View(None, frozenset(), None, False)


def _view(backend: Backend) -> _View:
    return _View(backend.healthy if backend.last_check is not None else None,
                 frozenset(kind for kind in backend.quarantine if kind != "diverged"), backend.divergence,
                 backend.drained)


class Pick(NamedTuple):
    """A named tuple, not a frozen dataclass: one is made per attempt, and a frozen dataclass's
    ``__init__`` costs four times as much."""

    backend: Backend | None
    #: Why a less trusted node was chosen ("integrity"), or None for a preferred one.
    fallback: str | None = None


class BackendPool:
    """All backends, with selection per route; mutated only by checks and request outcomes."""

    def __init__(self, urls: Iterable[BackendEntry], random: Callable[[], float] = _random.random,
                 max_block_lag: int = 10):
        self._random = random
        self._max_lag = max_block_lag
        self._breaker_policy = scoring.BreakerPolicy()
        #: Called with (backend, new state) on every breaker transition: metrics and logs.
        self.on_breaker_change: Callable[[Backend, str], None] | None = None
        #: Called with every routing transition (state/events.py): the dashboard's timeline.
        self.on_transition: Callable[[Transition], None] | None = None
        #: With SHARED_STATE, the fleet view /health shows (fleet/service.py sets it; --workers
        #: followers get the leading worker's); None without a fleet.
        self.fleet: dict[str, Any] | None = None
        self._seen: dict[Backend, _View] = {}
        self.backends: tuple[Backend, ...] = tuple(_backends(urls))
        self.set_breaker_policy(self._breaker_policy)
        self._tiers: dict[str, tuple[list[Backend], list[Backend]]] = {}
        self._falling_back: set[str] = set()
        #: The finalized block a majority of the healthy, agreeing nodes report (None: no majority
        #: yet, or a contested height: nothing may become immutable then).
        self.finalized: int | None = None
        #: The last cross-node agreement analysis (core/agreement.py).
        self.agreement = agreement.Agreement()
        self._no_finalized = False
        #: The majority chain of the healthy nodes, ``(l1ChainId, rollupVersion)`` (None: unknown).
        self._chain: tuple[str, str] | None = None
        #: What :meth:`chain_identity` answers, recomputed with ``_chain``.
        self._identity: tuple[str, ...] | None = None
        self._rebuild()

    def chain_identity(self) -> tuple[str, ...] | None:
        """The chain the gateway serves, which every cache key carries: ``(l1ChainId, rollupVersion,
        protocolContractsHash)``, the majority of the healthy nodes on the majority chain that report
        a hash; ``(l1ChainId, rollupVersion)`` when none of them does (older nodes). None until the
        health check knows a majority chain, or while the hashes reported tie (nothing is cached)."""
        return self._identity

    def _set_chain(self, chain: tuple[str, str] | None) -> None:
        """Set the majority chain and the chain identity that follows from it."""
        self._chain = chain
        if chain is None:
            self._identity = None
            return
        hashes = [b.protocol_contracts for b in self.backends
                  if b.healthy and b.chain == chain and b.protocol_contracts is not None]
        if not hashes:
            self._identity = chain
            return
        protocol_contracts = scoring.majority(hashes)
        self._identity = None if protocol_contracts is None else (*chain, protocol_contracts)

    def note_pruned(self, backend: Backend, block: int) -> None:
        """The node said it no longer keeps the state of ``block``: its known oldest block becomes
        at least ``block + 1`` at once (the next health round may move it further), and the routes
        are rebuilt, so calls about ``block`` go to a node that keeps it."""
        oldest = block + 1
        if backend.oldest_block is not None and backend.oldest_block >= oldest:
            return
        backend.oldest_block = oldest
        backend.rescore()
        self._rebuild()

    def replace(self, entries: Iterable[BackendEntry]) -> None:
        """Set the backend list, keeping the state of nodes that stay (under their new name, when the
        reload renamed them)."""
        current = {b.url: b for b in self.backends}
        kept = []
        for backend in _backends(entries):
            same = current.get(backend.url)
            if same is not None:
                same.name = backend.name
            kept.append(same or backend)
        self.backends = tuple(kept)
        self.set_breaker_policy(self._breaker_policy)
        self.reassess()

    def _rebuild(self) -> None:
        """Precompute each route's preferred and fallback candidates, so picking stays cheap."""
        # No fallback warning while a node awaits its first verdict: at start the verdicts arrive one
        # by one, and a node judged first, on its own, is no reason to warn.
        judged = all(b.verdict is not None for b in self.backends if b.eligible)
        for route, wanted in ROUTES.items():
            eligible = [b for b in self.backends if b.eligible and (not wanted or b.node_type == wanted)]
            preferred = [b for b in eligible if b.trusted]
            fallback = [b for b in eligible if not b.trusted]
            self._tiers[route] = (preferred, fallback)
            if not preferred and fallback and judged and route not in self._falling_back:
                self._falling_back.add(route)
                log.warn("no node with a good integrity verdict on {route}: serving from {nodes} as a fallback",
                         route=route, nodes=", ".join(f"{b.name} ({b.verdict.status if b.verdict else 'unchecked'})"
                                                      for b in fallback))
            elif preferred and route in self._falling_back:
                self._falling_back.discard(route)
                log.info("nodes with a good integrity verdict are back on {route}", route=route)
        self._note_transitions()

    def _note_transitions(self) -> None:
        """Tell the listener (and the log, once each) how the nodes' routing changed since the
        last rebuild. Health changes are logged by the health check, which knows why, and breaker
        changes by ``on_breaker_change``: here they only reach the listener."""
        seen = {}
        for backend in self.backends:
            now = seen[backend] = _view(backend)
            was = self._seen.get(backend, _UNSEEN)
            if now != was:
                self._compare(backend, was, now)
        self._seen = seen

    def _compare(self, backend: Backend, was: _View, now: _View) -> None:
        name = backend.name
        if now.healthy is not None and now.healthy != was.healthy:
            self._emit(Transition(name, "up", f"{name} up at block {backend.block_number}") if now.healthy
                       else Transition(name, "down", f"{name} down: {backend.last_error or 'no answer'}"))
        added = now.quarantine - was.quarantine
        if added:
            reason = "; ".join(backend.quarantine[kind] for kind in sorted(added))
            self._emit(Transition(name, "quarantined", f"{name} quarantined: {reason}"),
                       LogLevel.warn if "chain" in added else LogLevel.info,
                       "backend {backend} quarantined: {reason}", reason=reason, kinds=sorted(added))
        elif was.quarantine and not now.quarantine and now.healthy:
            cleared = ", ".join(sorted(was.quarantine))
            self._emit(Transition(name, "recovered", f"{name} recovered: {cleared} quarantine lifted"),
                       LogLevel.info, "backend {backend} recovered: its {cleared} quarantine is lifted",
                       cleared=cleared, kinds=sorted(was.quarantine))
        if now.divergence is not None and was.divergence is None:
            divergence = now.divergence
            self._emit(Transition(name, "diverged", f"{name} diverged: {divergence.reason()}"), LogLevel.warn,
                       "backend {backend} diverged from the majority: {reason}", reason=divergence.reason(),
                       height=divergence.height, hash=divergence.value, majority=divergence.majority,
                       kind=divergence.kind)
        elif now.divergence is None and was.divergence is not None:
            height = max((m.height for m in self.agreement.majorities), default=was.divergence.height)
            self._emit(Transition(name, "agrees", f"{name} agrees with the majority again at block {height}"),
                       LogLevel.info, "backend {backend} agrees with the majority again at block {height}",
                       height=height)
        if now.drained != was.drained:
            action = "drained" if now.drained else "undrained"
            self._emit(Transition(name, action, f"{name} {action} by an operator"), LogLevel.info,
                       "backend {backend} {action} by an operator", action=action)

    def _emit(self, transition: Transition, level: LogLevel | None = None, format: str = "",
              **fields: Any) -> None:
        """Hand ``transition`` to the listener; with a ``level``, log it as one event whose
        ``transition`` field names its kind."""
        if level is not None:
            log.emit(level, format, transition=transition.kind, backend=transition.node, **fields)
        if self.on_transition is not None:
            self.on_transition(transition)

    def candidates(self, route: str) -> list[Backend]:
        preferred, fallback = self._tiers[route]
        return preferred or fallback

    def pick(self, route: str, block: int | None = None, exclude: Sequence[Backend] = (),
             now: float = 0.0) -> Pick:
        """The prototype's weighted random choice among trusted nodes first, skipping nodes already
        tried, nodes whose breaker is open, and nodes that no longer keep ``block``."""
        preferred, fallback = self._tiers[route]
        candidates = [b for b in preferred if b not in exclude and b.keeps(block) and b.breaker.available(now)]
        if candidates:
            return Pick(self._choose(candidates))
        candidates = [b for b in fallback if b not in exclude and b.keeps(block) and b.breaker.available(now)]
        if candidates:
            return Pick(self._choose(candidates), "integrity")
        # Every candidate's breaker is open: a blip that tripped them all must not become an outage
        # until the cool-downs pass, so try them anyway (and say so).
        candidates = [b for b in preferred + fallback if b not in exclude and b.keeps(block)]
        return Pick(self._choose(candidates), "breaker") if candidates else Pick(None)

    def _choose(self, candidates: list[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        return scoring.weighted_choice(candidates, scoring.weights([b.priority for b in candidates]), self._random)

    #: What the worker running the checks hands to the other workers (--workers): everything the
    #: checks decide. Not breakers, drains or counters: those are each worker's own.
    SHARED_STATE = ("healthy", "block_number", "last_check", "last_error", "verdict", "chain", "protocol_contracts",
                    "oldest_block",
                    "lag", "quarantine", "tips", "tips_report", "tips_method", "archive", "divergence", "latency")

    def snapshot(self) -> dict[str, Any]:
        return {"finalized": self.finalized, "agreement": self.agreement,
                "entries": [(b.name, b.url) for b in self.backends],
                "backends": {b.url: {name: getattr(b, name) for name in self.SHARED_STATE} for b in self.backends}}

    def apply(self, snapshot: dict[str, Any]) -> None:
        """Take over the state the checks decided in another worker (backends matched by URL)."""
        self.finalized = snapshot["finalized"]
        self.agreement = snapshot.get("agreement", self.agreement)
        states = snapshot["backends"]
        for backend in self.backends:
            state = states.get(backend.url)
            if state is not None:
                for name, value in state.items():
                    setattr(backend, name, value)
                backend.rescore()
        self._set_chain(scoring.majority(b.chain for b in self.backends if b.healthy and b.chain is not None))
        self._rebuild()

    def find(self, name: str) -> Backend | None:
        """A backend by its display name, or by that name without its ``scheme://``: no ``/`` can
        travel in ``/admin/drain/<name>``."""
        return next((b for b in self.backends if name in (b.name, b.name.partition("://")[2] or b.name)), None)

    def drain(self, backend: Backend, drained: bool) -> None:
        backend.drained = drained
        self._rebuild()

    def set_max_lag(self, max_block_lag: int) -> None:
        self._max_lag = max_block_lag
        self.reassess()

    def set_breaker_policy(self, policy: scoring.BreakerPolicy) -> None:
        self._breaker_policy = policy
        for backend in self.backends:
            backend.breaker.policy = policy
            backend.breaker.on_change = partial(self._breaker_changed, backend)

    def _breaker_changed(self, backend: Backend, state: str) -> None:
        if self.on_breaker_change is not None:
            self.on_breaker_change(backend, state)
        self._emit(Transition(backend.name, "breaker", f"{backend.name} circuit breaker {state}"))

    def hedge_delay(self, route: str) -> float | None:
        """The lowest p95 latency (ms) among the route's nodes: if the first node has not answered
        by the time the fastest node usually has, a hedge is worth sending."""
        preferred, fallback = self._tiers[route]
        latencies = [p for p in (b.p95_latency() for b in preferred + fallback) if p is not None]
        return min(latencies) if latencies else None

    def history_floor(self, route: str) -> int | None:
        """The oldest block some eligible node of the route keeps (0 when one keeps all or does not say)."""
        preferred, fallback = self._tiers[route]
        nodes = preferred + fallback
        if not nodes:
            return None
        return min(0 if b.oldest_block is None else b.oldest_block for b in nodes)

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    def record_health(self, backend: Backend, healthy: bool, now: float, block_number: int | None = None,
                      latency_ms: float | None = None, error: str | None = None,
                      chain: tuple[str, str] | None = None, protocol_contracts: str | None = None,
                      oldest_block: int | None = None,
                      tips: Any = None, tips_report: TipsReport | None = None,
                      archive: tuple[int, str] | None = None) -> None:
        """One health round's findings. With ``tips_report`` (the health check always sends one for a
        node that answered), ``tips`` and ``archive`` are this round's word, None included: a node
        whose tips stopped must not keep voting with old ones. Without it, None leaves them as they were."""
        backend.healthy = healthy
        backend.last_check = now
        backend.last_error = error
        if block_number is not None:
            backend.block_number = block_number
        if latency_ms is not None:
            backend.latency.add(latency_ms)
        if chain is not None:
            backend.chain = chain
        if protocol_contracts is not None:
            backend.protocol_contracts = protocol_contracts
        if oldest_block is not None:
            backend.oldest_block = oldest_block
        if tips_report is not None:
            backend.tips_report = tips_report
            backend.tips = tips if tips_report.ok else None
            backend.archive = archive
        elif tips is not None:
            backend.tips = tips
        backend.rescore()
        self._rebuild()

    def record_integrity(self, backend: Backend, verdict: IntegrityVerdict) -> None:
        backend.verdict = verdict
        backend.rescore()
        self._rebuild()

    def reassess(self) -> None:
        """Quarantine nodes on another chain than the majority, then nodes whose finalized blocks
        differ from the majority's ("diverged"), then nodes lagging the best block.

        Chain first: a node on another rollup may be far ahead, and must not set the bar for lag (nor
        count as diverged: its hashes differ by design). A diverged node sets no bar for lag either,
        and has no say in the finalized tip.
        """
        healthy = [b for b in self.backends if b.healthy]
        chain = scoring.majority(b.chain for b in healthy if b.chain is not None)
        self._set_chain(chain)
        for backend in self.backends:
            backend.quarantine.clear()
            if chain is not None and backend.chain is not None and backend.chain != chain:
                backend.quarantine["chain"] = (f"l1ChainId {backend.chain[0]}, rollupVersion {backend.chain[1]} "
                                               f"differ from the majority's {chain[0]}, {chain[1]}")
        same_chain = [b for b in healthy if "chain" not in b.quarantine]
        self._reassess_agreement(same_chain)
        agreeing = [b for b in same_chain if b.divergence is None]
        best = max((b.block_number for b in agreeing), default=0)
        # Votes of the healthy, agreeing nodes on the majority chain: never a single node's claim,
        # and nothing at all while a height is contested.
        contested = self.agreement.contested
        self._set_finalized(None if contested is not None else finalized_tip(b.tips for b in agreeing), agreeing)
        for backend in self.backends:
            backend.lag = max(0, best - backend.block_number) if backend.healthy else 0
            reason = scoring.lag_reason(backend.block_number, best, self._max_lag) if backend.healthy else None
            if reason is not None:
                backend.quarantine["lag"] = reason
        self._rebuild()

    def _reassess_agreement(self, voters: list[Backend]) -> None:
        """Compare the voters' block hashes (core/agreement.py); quarantine the diverged nodes.

        Nodes go in by display name: a contest is sticky across rounds and reloads, and /health and
        the log show its sides as they are kept, so a URL (with its credentials) must never be one."""
        reports = {b.name: agreement.Report(agreement.parse_tips(b.tips), b.archive) for b in voters}
        previous = {b.name: b.divergence for b in self.backends if b.divergence is not None}
        before = self.agreement
        self.agreement = agreement.analyse(reports, previous, before.contested)
        for backend in self.backends:
            backend.divergence = now = self.agreement.diverged.get(backend.name)
            if now is not None:  # the transition is logged when the routes are rebuilt
                backend.quarantine["diverged"] = now.reason()
        contest = self.agreement.contested
        if contest is not None and before.contested is None:
            log.warn("nodes disagree and no majority decides: {reason}; nothing becomes immutable in the cache "
                     "until a majority agrees at or above block {height}", reason=contest.reason(),
                     height=contest.height)
        elif contest is None and before.contested is not None:
            log.info("a majority agrees again at or above block {height}", height=before.contested.height)

    def _set_finalized(self, finalized: int | None, voters: list[Backend]) -> None:
        """Set the finalized tip, saying so once when it becomes unknown (the cache then makes
        nothing immutable) and once when it is known again."""
        self.finalized = finalized
        if finalized is None and voters and not self._no_finalized:
            self._no_finalized = True
            if self.agreement.contested is not None:
                reason = "a height is contested (see the warning above)"
            else:
                silent = [b.name for b in voters if agreement.parse_tips(b.tips) is None]
                reason = (f"no majority of the {len(voters)} healthy, agreeing nodes reports one"
                          + (f" (no readable tips from {', '.join(silent)})" if silent else ""))
            log.warn("no finalized tip: {reason}; nothing is cached as immutable until there is one", reason=reason)
        elif finalized is not None and self._no_finalized:
            self._no_finalized = False
            log.info("finalized tip known again: block {block}", block=finalized)

    @staticmethod
    def record_outcome(backend: Backend, now: float, *, attempt: str | None = None,
                       latency_ms: float | None = None, reply_status: int | None = None) -> None:
        """The one way the request path tells a node's state how the node did: its breaker, the
        latencies behind the hedge delay, and the totals of /health.

        ``attempt`` ends one call to the node: "answered" (its ``latency_ms`` feeds the p95 that
        sets the hedge delay), "failed" (charged to the breaker), or "abandoned" (cancelled, or an
        answer too large for the caller: no sign of a failing node, but a half-open probe slot is
        free again). ``reply_status`` ends a caller's request whose reply came from (or failed at)
        the node: /health counts it once per request, as an error when >= 500, whatever the attempts.
        """
        if attempt == "answered":
            if latency_ms is not None:
                backend.answer_latency.append(latency_ms)
                backend.answered += 1
            backend.breaker.record(True, now)
        elif attempt == "failed":
            backend.breaker.record(False, now)
        elif attempt == "abandoned":
            backend.breaker.abandon()
        elif attempt is not None:
            raise ValueError(f"unknown attempt outcome {attempt!r}")
        if reply_status is not None:
            backend.total_requests += 1
            if reply_status >= 500:
                backend.total_errors += 1
