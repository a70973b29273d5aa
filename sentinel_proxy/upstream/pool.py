"""One node's keep-alive connections for :class:`~sentinel_proxy.upstream.http11.FastForwardingClient`.

Everything that depends only on the node's URL (endpoint, request line, Host header) is computed
once here and cached by the client per ``Backend.target``, so a request pays for none of it.
Idle connections form a LIFO stack: under load the same few hot connections serve everything and
the surplus at the bottom ages out, timed by ONE ``callLater`` per node instead of one timer per
checkin (a DelayedCall is ~1.5 µs to schedule and cancel; the 38 µs/request budget of a bare
pass-through has no room for two of them per request).
"""
from __future__ import annotations

import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

if TYPE_CHECKING:
    from sentinel_proxy.upstream.http11 import _Connection

#: Headers the client writes itself (framing, routing) or that describe the caller's own
#: connection; a caller's copy would corrupt the request's framing. Lower case: names are
#: compared lower-cased, whatever case the caller's pairs use.
HOP_BY_HOP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
                        b"upgrade", b"te", b"trailer", b"proxy-connection"})
HOP_BY_HOP_AND_AUTH = HOP_BY_HOP | {b"authorization"}


def node_endpoint(reactor: Any, scheme: str, host: str, port: int, connect_timeout: float,
                  trust_root: Any = None) -> IStreamClientEndpoint:
    """Plain TCP endpoints for IP literals, ``HostnameEndpoint`` for names; TLS wrapped around either.

    ``HostnameEndpoint`` notices that its last address refused the connection only at its next
    0.3 s attempt tick, so every attempt at a dead node given by IP would cost 300 ms before
    failover; an IP literal needs no resolution and no racing of addresses.
    """
    if isIPAddress(host):
        endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    if scheme == "https":
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import optionsForClientTLS  # needs pyOpenSSL: only for https nodes

        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust_root), endpoint)
    return endpoint


class NodePool:
    """Idle keep-alive connections to one node, newest last, and the parsed form of its URL."""

    __slots__ = ("head", "endpoint", "tls", "_reactor", "_idle", "_max_idle", "_idle_timeout", "_probe_after",
                 "_sweeper", "closed")

    def __init__(self, reactor: Any, target: bytes, max_idle: int, idle_timeout: float, connect_timeout: float,
                 probe_after: float, trust_root: Any = None):
        parts = urlsplit(target.decode("ascii"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {target!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        #: Request line and Host header: every request starts with these same bytes.
        self.head = b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (path.encode("ascii"), parts.netloc.encode("ascii"))
        self.tls = parts.scheme == "https"
        self.endpoint = node_endpoint(reactor, parts.scheme, parts.hostname, port, connect_timeout, trust_root)
        self._reactor = reactor
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._probe_after = probe_after
        self._sweeper: Any = None
        self.closed = False

    def request(self, body: bytes, headers: Iterable[tuple[bytes, bytes]], authorization: bytes | None) -> bytes:
        """The whole request as one bytes object, written in one ``transport.write``; ``headers``
        are (name, value) pairs, written as given minus the ones the client writes itself.

        Twisted's agent writes headers and body separately; with Nagle on, the body waited for
        the node's delayed ACK (+23 ms p50). One write needs no such luck.
        """
        parts = [self.head]
        skip = HOP_BY_HOP if authorization is None else HOP_BY_HOP_AND_AUTH
        for name, value in headers:
            if name.lower() not in skip:
                parts += (name, b": ", value, b"\r\n")
        if authorization is not None:
            parts += (b"Authorization: ", authorization, b"\r\n")
        parts += (b"Content-Length: %d\r\n\r\n" % len(body), body)
        return b"".join(parts)

    def checkout(self) -> _Connection | None:
        """The most recently used live idle connection, or None: the caller dials a new one.

        A connection the node closed between requests is dropped here, before a byte of the new
        request is written, which is the only moment a re-send on a fresh connection is safe.
        The reactor usually has noticed the close already; a FIN still in the kernel's buffer is
        found by a non-blocking MSG_PEEK (1.3 µs), done only for connections idle for
        ``probe_after`` seconds: a node closes idle connections after seconds (its keep-alive
        timeout), so a busy gateway's connections, reused within milliseconds, need no probe.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            transport = conn.transport
            if not transport.disconnecting and (
                    self.tls or self._reactor.seconds() - conn.idle_since < self._probe_after or _open(transport)):
                return conn
            transport.abortConnection()
        return None

    def checkin(self, conn: _Connection) -> None:
        """Keep ``conn`` for the next request, unless the pool is full or closed."""
        idle = self._idle
        if self.closed or len(idle) >= self._max_idle:
            conn.transport.loseConnection()
            return
        conn.idle_since = self._reactor.seconds()
        conn.pooled = True
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def lost(self, conn: _Connection) -> None:
        """An idle connection closed (by the node, or by us): forget it."""
        conn.pooled = False
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; re-arm for the oldest of the others."""
        self._sweeper = None
        idle = self._idle
        now = self._reactor.seconds()
        while idle and now - idle[0].idle_since >= self._idle_timeout:
            conn = idle.popleft()
            conn.pooled = False
            conn.transport.loseConnection()
        if idle:
            delay = max(0.0, idle[0].idle_since + self._idle_timeout - now)
            self._sweeper = self._reactor.callLater(delay, self._sweep)

    def close(self) -> list[defer.Deferred[None]]:
        """Close every idle connection; one Deferred per connection, fired once it is gone."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        gone = []
        while self._idle:
            conn = self._idle.pop()
            conn.pooled = False
            gone.append(conn.when_lost())
            conn.transport.loseConnection()
        return gone


def _open(transport: Any) -> bool:
    """Whether the node has neither closed the socket nor sent anything on it since the last answer."""
    try:
        transport.getHandle().recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # b"": end of stream; bytes: an answer nobody asked for. Neither is reusable.
