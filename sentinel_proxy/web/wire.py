"""The bytes the lean server (web/server.py) writes, and the requests it rebuilds for the Site.

Answers are built as one bytes join from precomputed pieces: a status line per status (no
formatting per request), the reply's header pairs as given, ``Content-Length``, the connection
line, the body. The ``Date`` line is formatted once a second, not once an answer.
"""
from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus
from typing import Sequence

from sentinel_proxy.proxy.values import Reply

#: ``HTTP/1.1 <status> <phrase>\r\n`` for every status Python knows.
STATUS_LINES: dict[int, bytes] = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii"))
                                  for s in HTTPStatus}
STATUS_LINES[413] = b"HTTP/1.1 413 Content Too Large\r\n"  # RFC 9110's name (Python 3.11 has the old one)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# What an answer says about the connection (``_Exchange.close`` in web/server.py).
KEEP_SAID, KEEP, CLOSE, LINGER_CLOSE = -1, 0, 1, 2
CONNECTION_LINES = {KEEP: b"", KEEP_SAID: b"connection: keep-alive\r\n", CLOSE: b"connection: close\r\n",
                    LINGER_CLOSE: b"connection: close\r\n"}


def status_line(status: int) -> bytes:
    return STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class Dates:
    """The ``Date`` header line (an origin server with a clock must send one), cached per second."""

    __slots__ = ("_second", "_line")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"date: %s\r\n" % formatdate(second, usegmt=True).encode("ascii")
        return self._line


def encode(reply: Reply, close: int, date: bytes) -> bytes:
    """A reply as it goes on the wire: its headers as given, then length and connection lines."""
    body = reply.body
    parts = [STATUS_LINES.get(reply.status) or status_line(reply.status), date]
    for name, value in reply.headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"content-length: %d\r\n%s\r\n" % (len(body), CONNECTION_LINES[close]), body)
    return b"".join(parts)


def plain(status: int, text: bytes, date: bytes, close: int = LINGER_CLOSE) -> bytes:
    """The server's own small answers (400, 413, 431, 500, ...): plain text."""
    return b"%s%scontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status_line(status), date, len(text), CONNECTION_LINES[close], text)


#: Framing the rebuilt request states itself, and the expectation the lean server answered.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"expect"})


def rebuild(method: bytes, url: bytes, version: str, headers: Sequence[tuple[bytes, bytes]], body: bytes,
            upgrade: bool) -> bytes:
    """A request as the Site's channel should receive it, from what llhttp gave: the request line
    and headers as received, the (de-chunked) body with a ``Content-Length``.

    llhttp cannot say where a request began in the bytes, so they cannot be replayed; a rebuilt
    message is unambiguous (llhttp refused any that was not). An upgrade request keeps its framing:
    llhttp skipped its body, which follows as it came.
    """
    parts = [method, b" ", url, b" HTTP/", version.encode("ascii"), b"\r\n"]
    framed = False
    for name, value in headers:
        if not upgrade:
            lower = name.lower()
            if lower in _FRAMING:
                framed = framed or lower != b"expect"
                continue
        parts += (name, b": ", value, b"\r\n")
    if not upgrade and (body or framed):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    parts += (b"\r\n", body)
    return b"".join(parts)
