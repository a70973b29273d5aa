"""Pure JSON-RPC 2.0 request validation, method policy and error bodies (no I/O).

Codes and HTTP statuses follow the Aztec node (../shared/docs/aztec-node-api.md), so a client
cannot tell a refusal by the gateway from one by a node, except by the message. The gateway's own
failures (no node, node unreachable) use the implementation-defined server range -32000..-32099.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
#: Gateway-defined: no healthy node can take the call (HTTP 503).
NO_BACKEND = -32001
#: Gateway-defined: the node could not be reached, failed, or answered garbage (HTTP 502).
UPSTREAM_FAILED = -32002
#: Gateway-defined: the node did not answer within the deadline (HTTP 502).
UPSTREAM_TIMEOUT = -32003
#: Gateway-defined: the call reads at a block no healthy node keeps any more (HTTP 400, like a
#: node's own failure, so that clients do not retry it as an outage).
BLOCK_UNAVAILABLE = -32004
#: Gateway-defined: too many requests in flight (HTTP 503 with Retry-After).
OVERLOADED = -32005
#: Gateway-defined: the client's rate limit is exhausted (HTTP 429 with Retry-After).
RATE_LIMITED = -32006
#: Gateway-defined: the request presented an API key the gateway does not know (HTTP 401).
UNKNOWN_API_KEY = -32007

#: Never forwarded, whatever the policy says: the node's admin API (aztec-node-api.md).
ADMIN_PREFIX = "nodeAdmin_"
#: Calls with effects (writes): sent to a second node only if the first provably never got them.
UNSAFE_METHODS = frozenset({"node_sendTx"})

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(value: Any) -> bytes:
    """Compact JSON, as the Aztec node writes it."""
    return _encoder.encode(value).encode("utf-8")


def error_item(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def error_body(request_id: Any, code: int, message: str) -> bytes:
    return encode(error_item(request_id, code, message))


@dataclass(frozen=True)
class MethodPolicy:
    """Which methods go upstream: names or ``namespace_*`` patterns; deny wins over allow, and
    ``nodeAdmin_*`` is refused whatever either list says."""

    allow: tuple[str, ...] = ("node_*", "p2p_*")
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("allow", "deny"):
            patterns = getattr(self, name)
            object.__setattr__(self, f"_{name}_exact", frozenset(p for p in patterns if not p.endswith("*")))
            object.__setattr__(self, f"_{name}_prefixes", tuple(p[:-1] for p in patterns if p.endswith("*")))

    def allows(self, method: str) -> bool:
        if method.startswith(ADMIN_PREFIX):
            return False
        if method in self._deny_exact or method.startswith(self._deny_prefixes):  # type: ignore[attr-defined]
            return False
        return method in self._allow_exact or method.startswith(self._allow_prefixes)  # type: ignore[attr-defined]


DEFAULT_POLICY = MethodPolicy()


class RequestError(Exception):
    """The whole request is refused with one JSON-RPC error (a single call, or a broken batch)."""

    def __init__(self, code: int, message: str, request_id: Any = None, http_status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.http_status = http_status

    def body(self) -> bytes:
        return error_body(self.request_id, self.code, self.message)


@dataclass(frozen=True, slots=True)
class Call:
    """One valid, allowed call, with its position in the caller's request."""

    position: int
    method: str
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    is_batch: bool
    calls: tuple[Call, ...]
    #: Batch items refused locally: position -> error item (never sent upstream).
    refused: dict[int, dict[str, Any]]

    @property
    def size(self) -> int:
        return len(self.calls) + len(self.refused)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(call.method for call in self.calls)


def _check_call(item: Any, policy: MethodPolicy) -> tuple[str | None, dict[str, Any] | None]:
    """Return (method, None) for a valid allowed call, else (None, error item)."""
    if not isinstance(item, dict):
        return None, error_item(None, INVALID_REQUEST, "Invalid Request: not a JSON object")
    request_id = item.get("id")
    if isinstance(request_id, (dict, list, bool)):
        return None, error_item(None, INVALID_REQUEST, "Invalid Request: id must be a string, number or null")
    if item.get("jsonrpc") != "2.0":
        return None, error_item(request_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    method = item.get("method")
    if not isinstance(method, str) or not method:
        return None, error_item(request_id, INVALID_REQUEST, 'Invalid Request: "method" must be a string')
    params = item.get("params", [])
    if not isinstance(params, (list, dict)):
        return None, error_item(request_id, INVALID_REQUEST, 'Invalid Request: "params" must be an array or object')
    if not policy.allows(method):
        return None, error_item(request_id, METHOD_NOT_FOUND, f"Method not allowed by this gateway: {method}")
    return method, None


def parse_request(body: bytes, max_batch: int, policy: MethodPolicy = DEFAULT_POLICY) -> ParsedRequest:
    """Validate a request body once; raise :class:`RequestError` when nothing can be forwarded.

    In a batch, a bad or refused item becomes that item's own error (as a node answers it) while
    the other items are still served; a refused single call refuses the request.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(PARSE_ERROR, "Parse error: the body is not valid JSON") from None
    if isinstance(document, list):
        if not document:
            raise RequestError(INVALID_REQUEST, "Invalid Request: empty batch")
        if len(document) > max_batch:
            raise RequestError(
                INVALID_REQUEST, f"Invalid Request: batch of {len(document)} calls exceeds the limit of {max_batch}")
        calls: list[Call] = []
        refused: dict[int, dict[str, Any]] = {}
        for position, item in enumerate(document):
            method, error = _check_call(item, policy)
            if error is not None:
                refused[position] = error
            else:
                calls.append(Call(position, method, item))
        return ParsedRequest(True, tuple(calls), refused)
    method, error = _check_call(document, policy)
    if error is not None:
        raise RequestError(error["error"]["code"], error["error"]["message"], error["id"])
    return ParsedRequest(False, (Call(0, method, document),), {})


def safe_to_repeat(calls: tuple[Call, ...]) -> bool:
    return not any(call.method in UNSAFE_METHODS for call in calls)


def merge_batch(parsed: ParsedRequest, upstream_items: list[Any]) -> list[Any]:
    """Put a sub-batch's answers and the locally refused items back in the caller's order.

    The upstream answered ``parsed.calls`` as a sub-batch, so its items line up with those calls.
    """
    merged: list[Any] = [None] * parsed.size
    for position, item in parsed.refused.items():
        merged[position] = item
    for call, item in zip(parsed.calls, upstream_items, strict=True):
        merged[call.position] = item
    return merged
