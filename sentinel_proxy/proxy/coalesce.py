"""Single-flight: identical cacheable calls in flight share one upstream call.

Wallets and indexers poll the same things at the same moments (the tip, the same blocks); while
one of those calls is on its way to a node, every identical call — from any caller, in any batch —
waits for the same answer instead of sending its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


@dataclass(frozen=True, slots=True)
class Entry:
    """One call's answer, without its id: ``kind`` is "result", "error" or "missing" (not found),
    ``raw`` the JSON of the result or error (empty when missing)."""

    kind: str
    raw: bytes = b""


class Flight:
    """The leading call for a key; whoever else asks for the key waits on it."""

    __slots__ = ("key", "done", "_waiters", "_owner")

    def __init__(self, key: bytes, owner: SingleFlight):
        self.key = key
        self.done = False
        self._waiters: list[defer.Deferred[Entry]] = []
        self._owner = owner

    def wait(self) -> defer.Deferred[Entry]:
        waiter: defer.Deferred[Entry] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

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
            if not waiter.called:  # a waiter may have been cancelled with its request
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)


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
