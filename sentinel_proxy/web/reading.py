"""What llhttp says about each request on a lean connection (web/server.py): lean or for the Site,
and within its bounds.

llhttp (httptools) parses in C and calls back per piece; the callbacks here only collect slices
and decide, once a head is in, whether the request is lean (``POST`` on an RPC route, before any
handoff) or is rebuilt for the twisted.web Site. Sizes are summed once per head, not in every
``on_header`` (it is called for each header of each request). The connection's side of things
(``_dispatch``, ``_to_site``, ``_refuse``, ``_expect_continue``) is :class:`LeanHTTP`'s.
"""
from __future__ import annotations

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sentinel_proxy.ops.logs import observer
from sentinel_proxy.web.rpc import RPC_ROUTES
from sentinel_proxy.web.wire import CLOSE, KEEP, KEEP_SAID, LINGER_CLOSE, rebuild

log = Logger(observer=observer)

#: Bound on a request line and headers (llhttp itself sets none), and on their number.
MAX_HEAD_BYTES = 64 << 10
MAX_HEADERS = 100

# Modes of a connection: parsing lean requests; handing off (messages rebuilt for the Site's
# channel until the parser is at a message boundary); handed off (bytes passed straight on);
# closing (what arrives is dropped).
LEAN, REBUILD, RAW, DISCARD = 0, 1, 2, 3


class _Stop(Exception):
    """Raised in a parser callback to make llhttp stop at once: the rest of the data is moot."""


class RequestReader(Protocol):
    """The parser's callbacks and the state of the message being read."""

    __slots__ = ("_parser", "_clock", "_max_body", "_url", "_raw", "_body", "_size", "_head", "_in_head",
                 "_in_message", "_route", "_query", "_headers", "_keep", "_expect", "_upgrade", "_mode", "_idle_since",
                 "_body_since")

    def __init__(self, max_body: int, clock: IReactorTime):
        self._parser = HttpRequestParser(self)  # llhttp's strict defaults: never set_dangerous_leniencies
        self._clock = clock
        self._max_body = max_body
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = self._head = 0
        self._in_head = self._in_message = self._expect = self._upgrade = False
        self._route: str | None = None
        self._query = b""
        self._headers: dict[bytes, bytes] = {}
        self._keep = True
        self._mode = LEAN
        #: When the connection last became idle or a request began (the idle timeout and the header
        #: deadline count from it).
        self._idle_since = clock.seconds()
        #: When the body of the request being read began to be awaited (0: not yet noted); noted
        #: only when a read ends inside a message, so a request read whole costs no clock read.
        self._body_since = 0.0

    # What the connection does with what is read (LeanHTTP).
    def _dispatch(self, route: str, body: bytes, headers: dict[bytes, bytes], query: bytes, too_large: bool,
                  close: int) -> None:
        raise NotImplementedError

    def _to_site(self, message: bytes) -> None:
        raise NotImplementedError

    def _refuse(self, status: int, text: bytes) -> None:
        raise NotImplementedError

    def _expect_continue(self, expect: bytes) -> None:
        raise NotImplementedError

    def _read(self, data: bytes) -> None:
        """Parse what arrived (in LEAN or REBUILD mode)."""
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:  # what follows the head is not HTTP/1.1 framing: pass it on
            self._mode = RAW
            self._to_site(data[upgrade.args[0]:])
        except HttpParserError as error:
            if self._mode != DISCARD:  # not one of our own stops: the caller sent bad HTTP
                if error.__context__ is not None and not isinstance(error.__context__, _Stop):
                    log.failure("lean HTTP server: a parser callback failed", Failure(error.__context__))
                self._refuse(400, b"bad request: %s\n" % str(error).encode("ascii", "replace"))
        mode = self._mode
        if mode == REBUILD and not self._in_message:
            self._mode = RAW  # at a message boundary: from here on the bytes go as they came
        elif self._in_head and mode != DISCARD:
            # llhttp holds a header it has not finished: bound the bytes a head may take to arrive
            # (at most one read more than the head itself; the exact size is checked once it is in).
            self._head += len(data)
            if self._head > 2 * MAX_HEAD_BYTES:
                self._refuse(431, b"request header fields too large\n")
        elif self._in_message and not self._body_since and mode <= REBUILD:
            self._body_since = self._clock.seconds()  # the body deadline counts from here

    # ---------------------------------------------------------------------- llhttp's callbacks

    def on_message_begin(self) -> None:
        """The request's first byte: its header deadline counts from here (not from its URL, which
        a client could hold back behind a dripped method)."""
        self._in_head = self._in_message = True
        self._url = b""
        self._head = 0
        self._body_since = 0.0
        self._idle_since = self._clock.seconds()

    def on_url(self, url: bytes) -> None:
        self._url += url  # the request line may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._raw.append((name, value))
        else:  # a trailer after a chunked body: bounded with the body, otherwise ignored
            self._size += len(name) + len(value) + 4
            if self._size > self._max_body:
                self._too_large()

    def on_headers_complete(self) -> None:
        """Lean or not, and the head's bounds; sizes are summed here, not in every ``on_header``."""
        self._in_head = False
        parser = self._parser
        upgrade = parser.should_upgrade()
        route = None
        if self._mode == LEAN and not upgrade and parser.get_method() == b"POST":
            url = self._url
            route = RPC_ROUTES.get(url)
            if route is None and b"?" in url:
                path, _, self._query = url.partition(b"?")
                route = RPC_ROUTES.get(path)
        raw = self._raw
        size = len(self._url) + 4 * len(raw)
        headers: dict[bytes, bytes] = {}
        if route is None:  # for the Site: only framing and expectation are read here
            self._mode = self._mode or REBUILD
            for name, value in raw:
                size += len(name) + len(value)
                headers[name.lower()] = value
        else:
            for name, value in raw:
                size += len(name) + len(value)
                name = name.lower()
                value = value.rstrip(b" \t")  # llhttp strips the leading whitespace only
                if name in headers:
                    headers[name] += b", " + value
                else:
                    headers[name] = value
        self._headers = headers
        if size > MAX_HEAD_BYTES or len(raw) > MAX_HEADERS:
            self._refuse(431, b"request header fields too large\n")
            raise _Stop
        self._keep = keep = parser.should_keep_alive()
        if not keep and parser.get_http_version() not in ("1.1", "1.0"):
            self._refuse(505, b"HTTP/1.1 or HTTP/1.0 only\n")
            raise _Stop
        if upgrade:  # llhttp skips the body: it is handed on as it comes
            self._upgrade = True
            return
        framing = headers.get(b"transfer-encoding")
        if framing is not None and framing.strip().lower() != b"chunked":
            self._refuse(501, b"only the chunked transfer coding is implemented\n")
            raise _Stop
        length = headers.get(b"content-length")
        if length is not None and int(length) > self._max_body:
            self._route = route
            self._too_large()
        if b"expect" in headers:
            self._expect_continue(headers[b"expect"])
        self._route = route

    def on_body(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._max_body:
            self._too_large()
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._in_message = self._expect = False
        route = self._route
        body = b"".join(self._body)
        if route is not None:
            self._route = None
            headers = self._headers
            if not self._keep:
                close = CLOSE
            elif b"connection" in headers and b"keep-alive" in headers[b"connection"].lower():
                close = KEEP_SAID
            else:
                close = KEEP
            self._dispatch(route, body, headers, self._query, False, close)
        else:
            parser = self._parser
            self._to_site(rebuild(parser.get_method(), self._url, parser.get_http_version(), self._raw, body,
                                  self._upgrade))
        self._raw.clear()
        self._body.clear()
        self._size = 0
        self._query = b""
        self._upgrade = False
        if not self._keep:  # the caller closes after this one (and llhttp would refuse more)
            self._mode = DISCARD
            raise _Stop

    def _too_large(self) -> None:
        """A body past MAX_BODY_BYTES: the RPC routes let the request path write its JSON-RPC 413
        (and count it); the rest get a plain one. Either way the body is not read."""
        route = self._route
        if route is not None and self._mode == LEAN:
            self._route = None
            self._dispatch(route, b"", self._headers, self._query, True, LINGER_CLOSE)
            self._mode = DISCARD
        else:
            self._refuse(413, b"request body too large\n")
        raise _Stop

