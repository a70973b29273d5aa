"""One Redis connection pool with what every Redis user in the gateway needs: Redis is optional.

The cache and the rate limiter both treat Redis as an optimisation that must never slow down or
fail a request (design.md: while Redis is down, txredisapi calls hang forever, and each cancelled
call leaves a waiter behind until it reconnects). So every command here is cut off after a
timeout; after a failure no command reaches Redis for ``retry_interval`` seconds (callers decide
without it), then one command probes it again; an outage is logged once per ``log_interval``,
naming only the address and the reason (keys may hold API keys), and the recovery once.

Import this module only where Redis is used: importing txredisapi installs the default reactor.
"""
from __future__ import annotations

import math
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentinel_proxy.stores.cache_address import parse_redis_url
from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Seconds to wait for a TCP connection to Redis before txredisapi tries again.
CONNECT_TIMEOUT = 2.0
#: Seconds without a reply after which txredisapi drops a connection (a hung Redis, a partition
#: without a reset), so waiting replies do not pile up on a dead connection.
REPLY_TIMEOUT = 2.0


class RedisLink:
    def __init__(self, url: str, reactor: IReactorTime, timeout: float, *, role: str, outage: str,
                 poolsize: int = 2, retry_interval: float = 1.0, log_interval: float = 60.0):
        """``role`` names the user in log lines ("Redis cache"); ``outage`` says what callers get
        meanwhile ("serving cache misses")."""
        self.address = parse_redis_url(url)
        self._reactor = reactor
        self.timeout = timeout
        self._role = role
        self._outage = outage
        self._retry_interval = retry_interval
        self._log_interval = log_interval
        address = self.address
        # charset=None and convertNumbers=False: values come back as the bytes that were stored
        # (by default b"1000" would come back as the integer 1000).
        self.client = txredisapi.lazyConnectionPool(
            host=address.host, port=address.port, dbid=address.db, poolsize=poolsize, reconnect=True,
            charset=None, convertNumbers=False, username=address.username, password=address.password,
            connectTimeout=CONNECT_TIMEOUT, replyTimeout=REPLY_TIMEOUT)
        self._retry_at = 0.0  # no command reaches Redis before this time
        self._next_report = 0.0  # no outage line is logged before this time
        self._unreported = 0  # failures since the last outage line
        self._outage_reported = False
        self.errors = 0

    @property
    def usable(self) -> bool:
        """False while skipping Redis after a failure (and for good once closed)."""
        return self._reactor.seconds() >= self._retry_at

    def command(self, name: str, *args: Any, **kwargs: Any) -> Deferred:
        try:
            sent = getattr(self.client, name)(*args, **kwargs)
        except Exception:
            sent = fail()
        return self.bounded(sent)

    def bounded(self, sent: Deferred) -> Deferred:
        return sent.addTimeout(self.timeout, self._reactor)

    def failed(self, failure: Failure) -> None:
        """Count and (rate-limited) log a failed command, and stop calling Redis for a while."""
        self.errors += 1
        self._unreported += 1
        now = self._reactor.seconds()
        self._retry_at = max(self._retry_at, now + self._retry_interval)  # inf once closed
        if now >= self._next_report:
            self._next_report = now + self._log_interval
            log.warn("{role} {address} unavailable ({reason}); {outage} ({failures} failed calls since the "
                     "last report)", role=self._role, address=str(self.address), reason=self._reason(failure),
                     outage=self._outage, failures=self._unreported)
            self._unreported = 0
            self._outage_reported = True

    def reachable(self) -> None:
        if self._outage_reported:
            self._outage_reported = False
            log.info("{role} {address} reachable again", role=self._role, address=str(self.address))

    def close(self) -> Deferred:
        """Disconnect (within a second at most); Redis is not used again. Closing twice is a no-op."""
        if self._retry_at == math.inf:
            return succeed(None)
        self._retry_at = math.inf
        try:
            closing = self.client.disconnect()
        except Exception:
            closing = fail()
        closing.addTimeout(1.0, self._reactor)
        return closing.addBoth(lambda _: None)

    def _reason(self, failure: Failure) -> str:
        if failure.check(defer.TimeoutError):
            return f"no answer within {self.timeout * 1000:g} ms"
        message = failure.getErrorMessage()
        name = failure.type.__name__ if failure.type is not None else "error"
        return f"{name}: {message}" if message else name
