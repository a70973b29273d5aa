"""Pure JSON-RPC 2.0 request validation, method policy and error bodies (no I/O).

Codes and HTTP statuses follow the Aztec node (../shared/docs/aztec-node-api.md), so a client
cannot tell a refusal by the gateway from one by a node, except by the message. The gateway's own
failures (no node, node unreachable) use the implementation-defined server range -32000..-32099.

Parsing is msgspec's (``msgspec.json``): a request is parsed once, each call into a small struct
whose ``id`` and ``params`` stay raw JSON bytes (``msgspec.Raw``). The id is never decoded and
re-encoded: wherever the gateway writes an answer item it puts the caller's id back byte for byte
(``123456789012345678901234567890``, ``1e2``, ``"\\u00e9"``, ``null``), and a call without an
id (a notification) gets an item without one, as the Aztec node writes it. Params are decoded
only when a stage needs them (the cache key, the block a call reads at).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

import msgspec
from msgspec import UNSET, Raw, UnsetType

from sentinel_proxy.core import methods

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

#: The node's admin API (aztec-node-api.md); every admin and debug namespace, in any case, is
#: refused whatever the policy says (:func:`.methods.refused_namespace`).
ADMIN_PREFIX = "nodeAdmin_"
#: Calls with effects (writes), by their wire names: sent to a second node only if the first
#: provably never got them. :func:`safe_to_repeat` reads the method table (``node_sendTx_x`` is a
#: ``sendTx`` to the node too).
UNSAFE_METHODS = frozenset(name for name in methods.full_names() if not methods.safe(name))

#: The id written when the caller's id cannot be told (a parse error, an item that is no object).
NULL_ID = b"null"

_encode = msgspec.json.encode


def encode(value: Any) -> bytes:
    """Compact JSON, UTF-8, as the Aztec node writes it."""
    return _encode(value)


def item_head(raw_id: bytes | None) -> bytes:
    """The start of an answer item: the caller's id as it wrote it, or no id for a notification."""
    return b'{"jsonrpc":"2.0"' if raw_id is None else b'{"jsonrpc":"2.0","id":' + raw_id


def error_bytes(raw_id: bytes | None, code: int, message: str) -> bytes:
    """An error item under the caller's own id bytes (None: no id key, a notification's answer)."""
    return b'%s,"error":{"code":%d,"message":%s}}' % (item_head(raw_id), code, _encode(message))


def error_item(request_id: Any, code: int, message: str) -> dict[str, Any]:
    """An error item as a value (``request_id`` decoded); the gateway itself writes :func:`error_bytes`."""
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


@dataclass(frozen=True)
class MethodPolicy:
    """Which methods go upstream: names or ``namespace_*`` patterns; deny wins over allow, and
    the admin and debug namespaces (``nodeAdmin_``, ``aztecAdmin_``, ``nodeDebug_``,
    ``aztecDebug_``, in any case) are refused whatever either list says."""

    allow: tuple[str, ...] = ("node_*", "aztec_*", "p2p_*")
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("allow", "deny"):
            patterns = getattr(self, name)
            object.__setattr__(self, f"_{name}_exact", frozenset(p for p in patterns if not p.endswith("*")))
            object.__setattr__(self, f"_{name}_prefixes", tuple(p[:-1] for p in patterns if p.endswith("*")))

    def allows(self, method: str) -> bool:
        verdicts: dict[str, bool] = self.__dict__.setdefault("_verdicts", {})
        verdict = verdicts.get(method)
        if verdict is None:
            verdict = self._allows(method)
            if len(verdicts) < 1024:  # bounded: method names come from callers
                verdicts[method] = verdict
        return verdict

    def _allows(self, method: str) -> bool:
        if methods.refused_namespace(method):
            return False
        if method in self._deny_exact or method.startswith(self._deny_prefixes):  # type: ignore[attr-defined]
            return False
        return method in self._allow_exact or method.startswith(self._allow_prefixes)  # type: ignore[attr-defined]


DEFAULT_POLICY = MethodPolicy()


class RequestError(Exception):
    """The whole request is refused with one JSON-RPC error (a single call, or a broken batch).

    ``raw_id`` is the caller's id as it wrote it (None: the call had no id), ``null`` when it
    cannot be told.
    """

    def __init__(self, code: int, message: str, raw_id: bytes | None = NULL_ID, http_status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.raw_id = raw_id
        self.http_status = http_status

    @property
    def request_id(self) -> Any:
        """The caller's id, decoded (None for null or none)."""
        return None if self.raw_id is None else msgspec.json.decode(self.raw_id)

    def body(self) -> bytes:
        return error_bytes(self.raw_id, self.code, self.message)


#: An id no answer item can match (not a string, a finite number or null).
NOT_AN_ID = object()


def id_key(raw_id: bytes) -> Any:
    """The id as the comparison of a node's answer with the request sees it.

    Strings compare by their decoded text (``"\\u0041"`` is ``"A"``), numbers by their value as a
    64-bit float, whatever their spelling (``1e2``, ``100`` and ``100.0`` are one id; so are
    ``-0`` and ``0``): the Aztec node is JavaScript, it parses every id into a double and writes it
    back in its own shortest form, so an id can only be recognised by that value. A string never
    equals a number, ``null`` only ``null``; anything else is :data:`NOT_AN_ID`.
    """
    try:
        value = msgspec.json.decode(raw_id)
    except msgspec.DecodeError:
        return NOT_AN_ID
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is int or kind is float:
        try:
            return float(value)
        except OverflowError:
            return NOT_AN_ID
    return NOT_AN_ID


_NOT_DECODED = object()


class Call:
    """One valid, allowed call, with its position in the caller's request.

    ``id`` is the caller's id as it wrote it (raw JSON bytes), None when the call has none (a
    notification); ``params_raw`` its params as written (None: absent).
    """

    __slots__ = ("position", "method", "id", "params_raw", "_params", "_key", "_request", "_block")

    def __init__(self, position: int, method: str, id: bytes | None, params_raw: Any = None,  # noqa: A002
                 key: Any = _NOT_DECODED):
        self.position = position
        self.method = method
        self.id = id
        self.params_raw = params_raw
        self._params: Any = _NOT_DECODED
        self._key = key
        self._request: dict[str, Any] | None = None
        self._block: Any = _NOT_DECODED

    def renumbered(self, position: int, raw_id: bytes) -> Call:
        """This call under another position and id (the gateway's own sub-batch)."""
        call = Call(position, self.method, raw_id, self.params_raw)
        call._params = self._params
        call._block = self._block
        return call

    @property
    def params(self) -> Any:
        """The params, decoded once on first use (``[]`` when absent)."""
        params = self._params
        if params is _NOT_DECODED:
            raw = self.params_raw
            if raw is None:
                params = []
            else:
                try:
                    params = msgspec.json.decode(raw)
                except msgspec.DecodeError:  # a number beyond a 64-bit float: what the standard library reads
                    params = json.loads(bytes(raw))
            self._params = params
        return params

    @property
    def key(self) -> Any:
        """The id as answers are matched against it (:func:`id_key`); None also for a notification."""
        key = self._key
        if key is _NOT_DECODED:
            key = self._key = None if self.id is None else id_key(self.id)
        return key

    @property
    def request(self) -> dict[str, Any]:
        """The call as a value (for :mod:`.routing`; built once, not to be changed): params
        decoded, the id decoded when present."""
        request = self._request
        if request is None:
            request = self._request = {"jsonrpc": "2.0", "method": self.method, "params": self.params}
            if self.id is not None:
                request["id"] = msgspec.json.decode(self.id) if self.id != NULL_ID else None
        return request

    @property
    def block(self) -> int | None:
        """The explicit block number this call reads at, if any (:func:`.routing.block_needed`)."""
        block = self._block
        if block is _NOT_DECODED:
            block = self._block = routing.block_needed(self)
        return block

    def __repr__(self) -> str:
        return f"Call({self.position}, {self.method!r}, id={self.id!r})"


class ParsedRequest:
    """The calls of a request worth sending on, and the items refused locally."""

    __slots__ = ("is_batch", "calls", "refused", "methods", "text", "refused_methods")

    def __init__(self, is_batch: bool, calls: tuple[Call, ...], refused: Mapping[int, bytes], text: bytes = b"",
                 refused_methods: tuple[str, ...] = ()):
        self.is_batch = is_batch
        self.calls = calls
        #: Batch items refused locally: position -> the error item's bytes (never sent upstream).
        self.refused = refused
        self.methods = tuple([call.method for call in calls])  # a list is built faster than a generator runs
        #: The method of each refused item, in request order ("?" where it has none): for the access log.
        self.refused_methods = refused_methods
        #: The request as parsed (after Content-Encoding): :func:`allowed_body` cuts the calls from it.
        self.text = text

    @property
    def size(self) -> int:
        return len(self.calls) + len(self.refused)

    def __repr__(self) -> str:
        return f"ParsedRequest(is_batch={self.is_batch}, calls={self.calls!r}, refused={sorted(self.refused)})"


class _Item(msgspec.Struct):
    """One call as msgspec reads it: what is checked is decoded, id and params stay raw."""

    jsonrpc: Any = UNSET
    method: Any = UNSET
    params: Union[Raw, UnsetType] = UNSET
    id: Union[Raw, UnsetType] = UNSET


#: A request in one pass: a batch of call objects, or one call object.
_read_calls = msgspec.json.Decoder(Union[list[_Item], _Item]).decode
#: When some batch item is not a call object: the items raw, each read on its own.
_read_document = msgspec.json.Decoder(Union[list[Raw], _Item]).decode
_read_item = msgspec.json.Decoder(_Item).decode
_read_raws = msgspec.json.Decoder(list[Raw]).decode

_NOT_AN_OBJECT = (NULL_ID, INVALID_REQUEST, "Invalid Request: not a JSON object")
_BAD_ID_TYPE = (NULL_ID, INVALID_REQUEST, "Invalid Request: id must be a string, number or null")
_NON_FINITE_ID = (NULL_ID, INVALID_REQUEST,
                  "Invalid Request: invalid id: not a finite JSON number (NaN, Infinity and numbers beyond "
                  "1.8e308 are refused)")
_NUMBER_START = frozenset(b"-0123456789")


def _id_refusal(raw_id: bytes) -> tuple[bytes, int, str] | None:
    """Why an id cannot be used, or None. A number must be finite as a 64-bit float: ``1E400``
    would come back from any node as ``Infinity`` or ``null``, and from the gateway as nothing
    valid, so it is refused rather than answered wrongly."""
    first = raw_id[0]
    if first == 0x22 or raw_id == NULL_ID:  # a string, null
        return None
    if first not in _NUMBER_START:
        return _BAD_ID_TYPE
    if len(raw_id) > 15 or b"e" in raw_id or b"E" in raw_id:
        try:
            float(msgspec.json.decode(raw_id))
        except (msgspec.DecodeError, OverflowError):
            return _NON_FINITE_ID
    return None


def _check_call(item: _Item, position: int, policy: MethodPolicy) -> Call | tuple[bytes | None, int, str]:
    """A valid allowed call, else (the id to answer under, code, message)."""
    raw_id = item.id
    if raw_id is UNSET:
        request_id: bytes | None = None
    else:
        request_id = bytes(raw_id)
        # The usual ids (a small integer, a string) need no closer look.
        if not (len(request_id) < 16 and request_id.isdigit()) and request_id[0] != 0x22:
            refusal = _id_refusal(request_id)
            if refusal is not None:
                return refusal
    if item.jsonrpc != "2.0":
        return request_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"'
    method = item.method
    if type(method) is not str or not method:
        return request_id, INVALID_REQUEST, 'Invalid Request: "method" must be a string'
    params = item.params
    if params is UNSET:
        params = None
    elif memoryview(params)[0] not in b"[{":
        return request_id, INVALID_REQUEST, 'Invalid Request: "params" must be an array or object'
    if not policy.allows(method):
        return request_id, METHOD_NOT_FOUND, f"Method not allowed by this gateway: {method}"
    return Call(position, method, request_id, params)


#: A ``\\uXXXX`` escape of a UTF-16 surrogate (high or low).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_json_because(body: bytes) -> str | None:
    """Why msgspec refused a body the standard library reads: "id" when a call's id is NaN /
    Infinity / -Infinity (JSON has no such numbers), "value" when something else is, "surrogate"
    when a string holds a lone UTF-16 surrogate (no valid text: a node, a log, an answer could
    not carry it); None when the body is not JSON even so."""
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    try:
        document = json.loads(body, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    if not constants:
        return "surrogate" if _SURROGATE_ESCAPE.search(body) else None
    items = document if isinstance(document, list) else [document]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("id"), float) and not math.isfinite(item["id"]):
            return "id"
    return "value"


def parse_request(body: bytes, max_batch: int, policy: MethodPolicy = DEFAULT_POLICY) -> ParsedRequest:
    """Validate a request body once; raise :class:`RequestError` when nothing can be forwarded.

    In a batch, a bad or refused item becomes that item's own error (as a node answers it) while
    the other items are still served; a refused single call refuses the request.
    """
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(PARSE_ERROR, "Parse error: the body is not valid UTF-8") from None
    try:
        try:
            document: Any = _read_calls(body)
        except msgspec.ValidationError:  # some batch item is not a call object: each on its own
            document = _read_document(body)
    except msgspec.ValidationError as exc:
        if body.lstrip()[:1] == b"{":
            raise RequestError(INVALID_REQUEST, f"Invalid Request: {exc}") from None
        raise RequestError(INVALID_REQUEST, "Invalid Request: not a JSON object or array") from None
    except (msgspec.DecodeError, RecursionError):
        where = _not_json_because(body)
        if where == "surrogate":
            raise RequestError(INVALID_REQUEST, "Invalid Request: a string holds a lone UTF-16 surrogate "
                                                "(\\ud800-\\udfff not in a pair)") from None
        if where == "id":
            raise RequestError(INVALID_REQUEST, "Invalid Request: invalid id: NaN, Infinity and -Infinity are not "
                                                "JSON numbers") from None
        if where is not None:
            raise RequestError(INVALID_REQUEST, "Invalid Request: NaN, Infinity and -Infinity are not JSON "
                                                "numbers") from None
        raise RequestError(PARSE_ERROR, "Parse error: the body is not valid JSON") from None
    if type(document) is list:
        count = len(document)
        if not count:
            raise RequestError(INVALID_REQUEST, "Invalid Request: empty batch")
        if count > max_batch:
            raise RequestError(
                INVALID_REQUEST, f"Invalid Request: batch of {count} calls exceeds the limit of {max_batch}")
        calls: list[Call] = []
        refused: dict[int, bytes] = {}
        refused_methods: list[str] = []
        for position, item in enumerate(document):
            if type(item) is Raw:
                try:
                    item = _read_item(item)
                except msgspec.ValidationError as exc:
                    message = "Invalid Request: not a JSON object" if memoryview(item)[0] != 0x7B else \
                        f"Invalid Request: {exc}"
                    refused[position] = error_bytes(NULL_ID, INVALID_REQUEST, message)
                    refused_methods.append("?")
                    continue
            checked = _check_call(item, position, policy)
            if type(checked) is Call:
                calls.append(checked)
            else:
                refused[position] = error_bytes(*checked)  # type: ignore[misc]
                refused_methods.append(item.method if type(item.method) is str else "?")
        return ParsedRequest(True, tuple(calls), refused, body, tuple(refused_methods))
    checked = _check_call(document, 0, policy)
    if type(checked) is not Call:
        raw_id, code, message = checked  # type: ignore[misc]
        raise RequestError(code, message, raw_id)
    return ParsedRequest(False, (checked,), {}, body)  # type: ignore[arg-type]


def allowed_body(parsed: ParsedRequest) -> bytes:
    """A batch of the calls that go upstream (the others were refused), each as the caller wrote it."""
    items = _read_raws(parsed.text)
    return b"[" + b",".join([items[call.position] for call in parsed.calls]) + b"]"


def safe_to_repeat(calls: tuple[Call, ...]) -> bool:
    """False when some call has effects (the method table's ``safe``: ``node_sendTx``,
    ``aztec_sendTx``, and ``*_sendTx_anything``, which the node serves as ``sendTx``)."""
    for call in calls:
        if not methods.safe(call.method):
            return False
    return True


def oldest_block(calls: tuple[Call, ...]) -> int | None:
    """The oldest block any of the calls reads at (each call's block worked out once, by
    :func:`.routing.block_needed`): the node that serves them all must keep it."""
    oldest = None
    for call in calls:
        block = call.block
        if block is not None and (oldest is None or block < oldest):
            oldest = block
    return oldest


def merge_batch(parsed: ParsedRequest, answered: Mapping[int, Any]) -> bytes:
    """The caller's batch answer: each call's item (by the caller's position) and the locally
    refused items, in the caller's order. A notification the node did not answer has no item."""
    for call in parsed.calls:
        if call.id is not None and call.position not in answered:
            raise ValueError(f"no answer for the call at position {call.position}")
    refused = parsed.refused
    parts = []
    for position in range(parsed.size):
        part = refused.get(position)
        if part is None:
            part = answered.get(position)
        if part is not None:
            parts.append(part)
    return b"[" + b",".join(parts) + b"]"


# ------------------------------------------------------------------ the gateway's own refusals


class _IdOnly(msgspec.Struct):
    """A call as read for nothing but its id (a request refused before or instead of parsing)."""

    id: Union[Raw, UnsetType] = UNSET


_read_shape = msgspec.json.Decoder(Union[list[Raw], _IdOnly]).decode
_read_id_only = msgspec.json.Decoder(_IdOnly).decode


def _answerable(raw_id: Union[Raw, UnsetType]) -> bytes | None:
    """The id to answer under: the caller's bytes, None for a notification, null for an id no
    answer could carry (NaN, 1E400, an object)."""
    if raw_id is UNSET:
        return None
    raw = bytes(raw_id)
    return raw if _id_refusal(raw) is None else NULL_ID


def ids_in(body: bytes) -> tuple[bool, list[bytes | None]] | None:
    """Whether ``body`` is a batch, and the id of each of its calls (an item that is no object:
    null), for an answer to a request the gateway refuses as a whole; None when no id can be told
    (not JSON, an empty batch, neither an object nor an array)."""
    try:
        document = _read_shape(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if type(document) is _IdOnly:
        return False, [_answerable(document.id)]
    ids: list[bytes | None] = []
    for item in document:
        try:
            ids.append(_answerable(_read_id_only(item).id))
        except msgspec.ValidationError:
            ids.append(NULL_ID)
    return (True, ids) if ids else None


def refusal_body(is_batch: bool, ids: list[bytes | None], code: int, message: str) -> bytes:
    """One error under each call's id; an array for a batch (a client matches items by position)."""
    if not is_batch:
        return error_bytes(ids[0], code, message)
    return b"[" + b",".join([error_bytes(raw_id, code, message) for raw_id in ids]) + b"]"


def refusal_of(parsed: ParsedRequest, code: int, message: str) -> bytes:
    """The gateway's error for every call of a parsed request, under each call's own id; items
    refused locally keep their own errors."""
    if not parsed.is_batch:
        return error_bytes(parsed.calls[0].id, code, message)
    parts = dict(parsed.refused)
    for call in parsed.calls:
        parts[call.position] = error_bytes(call.id, code, message)
    return b"[" + b",".join([parts[position] for position in range(parsed.size)]) + b"]"


# Last, as routing imports this module's names; imported here, not in Call.block, where an import
# statement cost a microsecond per call.
from sentinel_proxy.core import routing  # noqa: E402
