"""The seams between the gateway's parts, as small zope interfaces.

This module imports no reactor, no Klein and no txredisapi (which installs the default reactor on
import), so any module and any test can name an interface without side effects. Each
implementation is checked with ``zope.interface.verify.verifyObject`` in the tests.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface


class IResponseCache(Interface):
    """A store of serialised answers. No method ever fails: trouble is a miss or a dropped store."""

    def get(key: bytes) -> Deferred:
        """Fire with the stored bytes, or None on a miss (absent, expired, store unavailable)."""

    def set(key: bytes, value: bytes, ttl: float | None) -> Deferred:
        """Store ``value`` for ``ttl`` seconds and fire with None.

        ``ttl`` None or ``math.inf``: keep until evicted. ``ttl`` <= 0: store nothing.
        """

    def close() -> Deferred:
        """Release the store's resources; fire with None when done."""


class IRateLimiter(Interface):
    """Token buckets by key. ``take`` never fails because of the store: trouble means allowed."""

    def take(key: str, cost: float, rate: float, burst: float) -> Deferred:
        """Take ``cost`` tokens from ``key``'s bucket (``burst`` tokens, refilled at ``rate`` per
        second) if it holds that many, and fire with a :class:`Decision`. Raise ValueError at once
        unless ``rate`` and ``burst`` are positive and ``cost`` is not negative (all finite)."""

    def close() -> Deferred:
        """Release the store's resources; fire with None when done."""


class IForwardingClient(Interface):
    """Sends a caller's request to one node and brings back the node's answer untouched.

    The request path depends on this, not on an HTTP library, so its stages run in memory in the
    tests and the client can be swapped without touching them (UPSTREAM_CLIENT: ``fast``,
    sentinel_proxy/upstream/http11.py; ``treq``, for measurement, upstream/treq_client.py).
    """

    def post(backend, body: bytes, headers, timeout: float, limit: int | None = None):
        """POST ``body`` to the node; return an awaitable (a Deferred) of an ``UpstreamResponse``.

        ``headers`` is a sequence of (name: bytes, value: bytes) pairs, in any case; the client
        writes Host, Content-Length and the node's own Authorization itself and leaves out the
        caller's copies of those and of the other connection-level headers. The answer is
        ``UpstreamResponse(code, headers, body)``: ``headers`` a tuple of (name, value) pairs in
        the order received, names lower-cased, without the connection-level headers
        (content-length, connection, keep-alive, transfer-encoding, ...); ``body`` the bytes as
        the node sent them.

        The whole exchange is bounded by ``timeout`` seconds and the answer by ``limit`` bytes
        (default MAX_RESPONSE_BYTES). Fails with ``UpstreamError`` with ``kind`` "timeout",
        "connect" (the request provably never reached the node), "transport" or "too_large", or
        with ``LocalError`` when the gateway itself cannot open a connection (no descriptor, port
        or memory): never the node's failure. Cancelling it closes the connection and fails it
        with ``CancelledError``.
        """

    def close() -> Deferred:
        """Drop pooled connections; fire with None when done."""


class ICheckClient(Interface):
    """The control plane's calls to one node: the health and integrity checks' JSON-RPC requests.

    Separate from :class:`IForwardingClient` because checks want the opposite: answers decoded
    (gzip accepted), parsed, and anything but a usable HTTP 200 turned into a failed check.
    """

    def fetch(backend, body: bytes, timeout: float):
        """Coroutine: POST the JSON-RPC ``body`` and return a ``CheckAnswer`` (headers, decoded body).

        The whole exchange is bounded by ``timeout`` seconds (the deadline closes the connection)
        and the decoded body by CHECK_MAX_RESPONSE. Raises ``UpstreamError`` when the node gave
        no answer, ``LocalError`` when the gateway itself cannot open a connection (never the
        node's failure), and ``RpcCallError`` for any status but 200.
        """

    def batch(backend, calls, timeout: float):
        """Coroutine: ``calls`` ((method, params), ...) in one JSON-RPC batch, as ``fetch``.

        Returns (results, headers): one item per call, in the order of ``calls`` whatever order
        the node answers in, each the call's ``result`` or an ``RpcCallError`` (a ``CallError``
        with the JSON-RPC code for an error answer). Raises
        ``RpcCallError`` when the answer as a whole is not a JSON array.
        """
