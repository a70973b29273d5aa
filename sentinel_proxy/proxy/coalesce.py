"""Single-flight: identical cacheable calls in flight share one upstream call.

Wallets and indexers poll the same things at the same moments (the tip, the same blocks); while
one of those calls is on its way to a node, every identical call — from any caller, in any batch —
waits for the same answer instead of sending its own.

The upstream call belongs to everyone waiting for it, not to the request that started it: when
that request's caller goes away, the call goes on for the followers (:class:`SharedCall`), and it
is cancelled only once nobody waits for any of its answers.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)


class Unanswered(Exception):
    """The shared call ended without an answer for this key (every node failed, or it was cut)."""


class Entry(NamedTuple):
    """One call's answer, without its id: ``kind`` is "result", "error" or "missing" (not found),
    ``raw`` the JSON of the result or error (empty when missing). A named tuple, not a frozen
    dataclass: one is made per call answered, at half the cost."""

    kind: str
    raw: bytes = b""


class Flight:
    """The leading call for a key; whoever else asks for the key waits on it."""

    __slots__ = ("key", "done", "call", "_waiters", "_owner")

    def __init__(self, key: bytes, owner: SingleFlight):
        self.key = key
        self.done = False
        #: The upstream call that will answer the key (set when it starts).
        self.call: SharedCall | None = None
        self._waiters: list[defer.Deferred[Entry]] = []
        self._owner = owner

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def wait(self) -> defer.Deferred[Entry]:
        """The answer; cancelling the wait (its caller went away) leaves the others waiting."""
        waiter: defer.Deferred[Entry] = defer.Deferred(self._left)
        self._waiters.append(waiter)
        return waiter

    def _left(self, waiter: defer.Deferred[Entry]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            if self.call is not None:
                self.call.abandoned()

    def resolve(self, entry: Entry) -> None:
        self._finish(entry)

    def fail(self, reason: Failure | BaseException) -> None:
        self._finish(reason if isinstance(reason, Failure) else Failure(reason))

    def _finish(self, outcome: Any) -> None:
        if self.done:
            return
        self.done = True
        self._owner._landed(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)


class SharedCall:
    """One upstream call leading some flights: it runs on while its leader or any follower waits,
    is cancelled once nobody does, and leaves no flight unanswered however it ends."""

    __slots__ = ("_running", "_flights", "_answer", "_leader_waits")

    def __init__(self, running: defer.Deferred[Any], flights: list[Flight]):
        self._running = running
        self._flights = flights
        self._answer: defer.Deferred[Any] = defer.Deferred(self._leader_left)
        self._leader_waits = True
        for flight in flights:
            flight.call = self
        running.addBoth(self._landed)

    def leader(self) -> defer.Deferred[Any]:
        """What the call brings, for the request that started it; cancelling this does not cancel
        the call while others wait for it."""
        return self._answer

    def _leader_left(self, _: defer.Deferred[Any]) -> None:
        self._leader_waits = False
        self.abandoned()

    def abandoned(self) -> None:
        """Someone stopped waiting: cancel the call if that was the last one."""
        if not self._leader_waits and not self._running.called and not any(f.waiting for f in self._flights):
            self._running.cancel()

    def _landed(self, outcome: Any) -> None:
        for flight in self._flights:  # a flight the call did not resolve: its followers must not wait on
            flight.fail(Unanswered("the shared call brought no answer"))
        waits, self._leader_waits = self._leader_waits, False
        if waits:
            if isinstance(outcome, Failure):
                self._answer.errback(outcome)
            else:
                self._answer.callback(outcome)
        elif isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
            log.failure("a shared upstream call failed after its leader left", outcome)


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[bytes, Flight] = {}
        #: Calls that waited for another call's answer instead of going upstream.
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: bytes) -> defer.Deferred[Entry] | None:
        """Wait for the call in flight for ``key``, or None when there is none (lead it then)."""
        flight = self._flights.get(key)
        if flight is None:
            return None
        self.coalesced += 1
        return flight.wait()

    def lead(self, key: bytes) -> Flight:
        flight = self._flights[key] = Flight(key, self)
        return flight

    def _landed(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
