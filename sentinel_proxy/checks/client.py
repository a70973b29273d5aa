"""The control plane's client: the checks' JSON-RPC calls, through treq over a pool of their own.

treq because checks want what the request path must not do: its ``HTTPClient`` wraps the agent in
a ``ContentDecoderAgent``, so checks send ``Accept-Encoding: gzip`` and a 4.x validator-stats
answer (~2 MB) crosses the wire gzipped. Built on the checks' own small pooled agent
(:class:`~sentinel_proxy.upstream.client.PooledAgent`, made by the service and closed at
shutdown; :meth:`CheckClient.over`), with the gateway's TCP_NODELAY and connect timeout.

Bodies are read with :func:`read_body`, not treq's ``collect``/``json_content``: those have no
canceller and no bound, so a node stalling mid-body would keep its socket past the deadline and a
runaway answer would fill memory. Parsing is left to the caller: the big stats answer is parsed in
a thread pool (checks/integrity.py), not on the reactor thread.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.state.backends import Backend
from sentinel_proxy.upstream.client import BytesProducer, UpstreamError, bounded, read_body

#: The checks' own bound: MAX_RESPONSE_BYTES limits what callers may pull through the gateway,
#: and must not make a node's validator stats (~2 MB on 4.x, more with a long history) unreadable.
CHECK_MAX_RESPONSE = 256 * 1024 * 1024


class RpcCallError(Exception):
    """A check call got an answer that is not a usable JSON-RPC result."""


class CallError(RpcCallError):
    """A JSON-RPC error answer to one call, with its code: the health check tells "method not
    found" (the node speaks another dialect) from other errors."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.code = code


#: What a check call raises when the node, not the check, is at fault.
NODE_ERRORS = (UpstreamError, RpcCallError)


def request_body(method: str, params: list[Any], request_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()


def parse_json(what: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RpcCallError(f"{what}: answer is not JSON") from None


def result_of(method: str, document: Any) -> Any:
    """The ``result`` of one JSON-RPC answer, or the reason there is none."""
    if not isinstance(document, dict):
        raise RpcCallError(f"{method}: no JSON-RPC answer")
    if "error" in document:
        raise RpcCallError(f"{method}: error {document['error']!r:.200}")
    if "result" not in document:
        raise RpcCallError(f"{method}: no result")
    return document["result"]


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    headers: Headers
    body: bytes  # gunzipped


@implementer(ICheckClient)
class CheckClient:
    def __init__(self, http: HTTPClient, clock: IReactorTime, limit: int = CHECK_MAX_RESPONSE):
        self._http = http
        self._clock = clock
        self._limit = limit

    @classmethod
    def over(cls, agent: IAgent, clock: IReactorTime, limit: int = CHECK_MAX_RESPONSE) -> CheckClient:
        """A check client on ``agent``: the checks' ``PooledAgent.agent`` in the gateway, an
        in-memory agent in the tests."""
        return cls(HTTPClient(agent, data_to_body_producer=BytesProducer), clock, limit)

    async def _exchange(self, backend: Backend, body: bytes) -> CheckAnswer:
        headers = {b"content-type": [b"application/json"]}
        if backend.authorization is not None:
            headers[b"authorization"] = [backend.authorization]
        # No redirects: a node answering 3xx is misconfigured, and following one would send its
        # credentials elsewhere. Unbuffered: the body is read once, by read_body.
        response = await self._http.post(backend.target, data=body, headers=headers,
                                         allow_redirects=False, unbuffered=True)
        content = await read_body(response, self._limit)
        if response.code != 200:
            raise RpcCallError(f"HTTP {response.code}")
        return CheckAnswer(response.headers, content)

    async def fetch(self, backend: Backend, body: bytes, timeout: float) -> CheckAnswer:
        return await bounded(defer.Deferred.fromCoroutine(self._exchange(backend, body)), timeout, self._clock)

    async def batch(self, backend: Backend, calls: Sequence[tuple[str, list[Any]]],
                    timeout: float) -> tuple[list[Any], Headers]:
        """Answers are matched by id, not position, so a node that reorders them is still read right;
        an error answer is a :class:`CallError` carrying its code."""
        body = b"[" + b",".join(request_body(method, params, i) for i, (method, params) in enumerate(calls)) + b"]"
        answer = await self.fetch(backend, body, timeout)
        items = parse_json("batch", answer.body)
        if not isinstance(items, list):
            raise RpcCallError("batch: answer is not a JSON array")
        # Only integer ids can be ours; any other (a list, a bool) must not crash the lookup.
        by_id = {item["id"]: item for item in items if isinstance(item, dict) and type(item.get("id")) is int}
        results: list[Any] = []
        for i, (method, _) in enumerate(calls):
            item = by_id.get(i)
            error = item.get("error") if isinstance(item, dict) else None
            if isinstance(error, dict):
                code = error.get("code")
                results.append(CallError(f"{method}: error {error!r:.200}", code if type(code) is int else None))
                continue
            try:
                results.append(result_of(method, item))
            except RpcCallError as exc:
                results.append(exc)
        return results, answer.headers
