"""Helpers for tests that wait on Deferreds: bounded waits, never a fixed sleep to wait for a thing."""
from __future__ import annotations

from twisted.internet import defer, reactor, task


def fired(d: defer.Deferred):
    """The result of an already-fired Deferred (MemoryCache never makes anyone wait)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


async def bounded(d: defer.Deferred, seconds: float = 1.0):
    """The result of ``d``, failing the test if it takes longer than ``seconds`` (a hung call)."""
    watched = defer.Deferred()
    d.chainDeferred(watched)
    watched.addTimeout(seconds, reactor)
    try:
        return await watched
    except defer.TimeoutError:
        raise AssertionError(f"a cache call did not return within {seconds} s") from None


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)
