"""What a forwarding client brings back from a node: an answer, or why there is none.

Both clients (:mod:`.http11`, the default, and :mod:`.treq_client`, for measurement) and the
request path share these; they are also importable from :mod:`sentinel_proxy.upstream.client`.
So do the checks for :class:`LocalError`, the gateway's own failure to open a connection, which
both tell from a node's failure with :func:`local_error` and report through :class:`LocalErrors`.
"""
from __future__ import annotations

import errno
import os
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Why opening or connecting a socket can fail with no fault of the node's: the gateway is out of
#: file descriptors (EMFILE, ENFILE), local ports (EADDRNOTAVAIL) or kernel memory (ENOBUFS, ENOMEM).
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENOMEM})

#: Header pairs in the order received: (name, value), a name repeated for each of its values.
HeaderPairs = tuple[tuple[bytes, bytes], ...]


class UpstreamError(Exception):
    """The node gave no usable answer: ``kind`` is "timeout", "connect", "transport" or "too_large".

    Only "connect" proves the request never reached the node (what makes a write safe to retry).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class UpstreamResponse(NamedTuple):
    """A node's answer: its status, its headers as (lower-cased name, value) pairs in the order
    received, without the headers that describe the connection (content-length, connection,
    keep-alive, transfer-encoding, ...), and its body as sent (gzip stays gzip with the fast
    client). A named tuple, not a frozen dataclass: one is made per attempt, at half the cost."""

    code: int
    headers: HeaderPairs
    body: bytes


class LocalError(Exception):
    """The gateway could not open a connection to a node for want of its own resources.

    Not an :class:`UpstreamError` on purpose: every ``except UpstreamError`` (and the checks'
    ``NODE_ERRORS``) blames the node, and this must reach no breaker, attempt count or health
    verdict. ``errno`` says which resource ran out.
    """

    def __init__(self, number: int):
        super().__init__(f"the gateway cannot open a connection: {errno.errorcode.get(number, number)} "
                         f"({os.strerror(number)})")
        self.errno = number


def local_error(error: BaseException) -> LocalError | None:
    """The :class:`LocalError` a connect failure stands for, or None when the node may be at fault.

    Twisted reports a failed ``socket()`` as ``ConnectBindError`` and a failed ``connect()`` as a
    ``ConnectError`` subclass, the errno in ``osError`` either way; an ``OSError`` carries ``errno``.
    Called only once a connection has failed: the hot path never pays for it.
    """
    number = getattr(error, "osError", None)
    if number is None and isinstance(error, OSError):
        number = error.errno
    return LocalError(number) if type(number) is int and number in LOCAL_ERRNOS else None


class LocalErrors:
    """Counts the gateway's own failures (``metrics.local_errors``, label ``where``) and logs them,
    at most one line per ``every`` seconds with the number since the last line: once descriptors
    run out every request meets one, and a line for each would add disk writes to the trouble."""

    def __init__(self, clock: IReactorTime, where: str, metrics: Any = None, every: float = 10.0):
        self._clock = clock
        self._where = where
        self._metrics = metrics
        self._every = every
        self._next = float("-inf")
        self._unlogged = 0

    def report(self, error: LocalError, backend: str) -> None:
        if self._metrics is not None:
            self._metrics.local_errors.labels(self._where).inc()
        self._unlogged += 1
        now = self._clock.seconds()
        if now < self._next:
            return
        self._next = now + self._every
        count, self._unlogged = self._unlogged, 0
        log.error("local error ({where}) while connecting to {backend}: {reason}; {count} since the last such "
                  "line; not counted against the node", where=self._where, backend=backend, reason=str(error),
                  errno=errno.errorcode.get(error.errno, str(error.errno)), count=count)
