"""A raw-bytes HTTP client for the server tests: it sends bytes exactly as given and splits what
comes back into answers with llhttp, so a test sees the wire (interim 100s, order, closes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from httptools import HttpResponseParser
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.support import wait_for


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    #: The header names in the order they came, as written.
    names: list[bytes] = field(default_factory=list)

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class _Collector:
    def __init__(self) -> None:
        self.parser = HttpResponseParser(self)
        self.answers: list[Answer] = []
        self._headers: dict[bytes, bytes] = {}
        self._names: list[bytes] = []
        self._body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append(name)
        self._headers[name.lower()] = value

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self.parser.get_status_code(), self._headers, b"".join(self._body), self._names))
        self._headers, self._names, self._body = {}, [], []


def answers(data: bytes) -> list[Answer]:
    """Every complete answer in ``data``, interim ones (``100 Continue``) included."""
    collector = _Collector()
    collector.parser.feed_data(data)
    return collector.answers


class RawClient(Protocol):
    """Sends bytes as given, keeps every byte received, and knows when the server closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    @property
    def answers(self) -> list[Answer]:
        return answers(self.received)

    async def answer_count(self, count: int, timeout: float = 5.0) -> list[Answer]:
        await wait_for(lambda: len(self.answers) >= count, timeout, f"{count} answers")
        return self.answers

    async def wait_closed(self, timeout: float = 5.0) -> bytes:
        closing = self.closed
        if not closing.called:
            waiting: defer.Deferred[bytes] = defer.Deferred()
            closing.addBoth(lambda result: (waiting.callback(result), result)[1])
            waiting.addTimeout(timeout, reactor)
            return await waiting
        return self.received

    @property
    def is_closed(self) -> bool:
        return self.closed.called


async def connect(port: int) -> RawClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
