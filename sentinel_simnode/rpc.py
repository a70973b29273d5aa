"""The JSON-RPC envelope of a simulated node: parsing, dispatch, batches, errors, compression.

What a gateway must get right lives here: a batch is answered with one item per request (in request
order unless ``reorder`` says otherwise, each with its id), a failed single call is HTTP 400, "not found"
is a missing ``result`` key in 4.x and ``"result": null`` in 5.x, and an uncaught server fault is
-32600 in 4.x and -32603 in 5.x (HTTP 500 for a single call).  See ``docs/aztec-protocol.md``.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from typing import Any, Callable

from sentinel_simnode.chain import HEX64, ChainState, dumps

MAX_BATCH = 100  # RPC_MAX_BATCH_SIZE of a real node
MAX_BODY = 1 << 20  # RPC_MAX_BODY_SIZE of a real node (1 MB), before and after decompression
GZIP_MIN_BYTES = 1024  # answers above this are gzipped when the client accepts it

#: How a batch's answers may be ordered: as the requests (None), reversed, or shuffled.  JSON-RPC lets
#: a server answer a batch in any order; the real Aztec server keeps request order, the real client
#: matches by position, so a gateway that relies on order breaks on the other two.
REORDERINGS = (None, "reverse", "shuffle")

#: (params, state) -> result JSON, None for "not found", or raise ``RpcError``.
Handler = Callable[[list[Any], ChainState], "bytes | None"]


class RpcError(Exception):
    """A JSON-RPC error answer (code and message go on the wire)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


NULL_ID = b"null"
_HEAD = b'{"jsonrpc":"2.0"'


def head(id_json: bytes | None) -> bytes:
    """Start of a response object; a notification (no "id" key) is answered without an id, like gobench."""
    return _HEAD if id_json is None else _HEAD + b',"id":' + id_json


def error_json(id_json: bytes | None, code: int, message: str) -> bytes:
    """One serialised JSON-RPC error response."""
    return head(id_json) + b',"error":' + dumps({"code": code, "message": message}).encode() + b"}"


def params_error(what: str) -> RpcError:
    """-32701, what the real server answers when the params fail schema validation."""
    return RpcError(-32701, f"Invalid params: {what}")


def param(params: list[Any], index: int) -> Any:
    """Positional parameter or None; JS clients send ``undefined`` optionals as null or omit them."""
    return params[index] if index < len(params) else None


def is_int(value: Any) -> bool:
    """A JSON integer (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def tx_hash_param(params: list[Any]) -> str:
    """The first parameter as a tx hash (0x + 64 hex), else -32701."""
    value = param(params, 0)
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise params_error("expected a tx hash (0x + 64 hex)")
    return value


class JsonRpcEngine:
    """Answers JSON-RPC bodies with a method table, in one dialect's envelope.

    ``handlers`` maps full method names (``node_getBlock``, ``aztec_getBlock``) to handlers and may be
    swapped whole (the node does on a scenario change; tests do to inject a fault: a handler raising
    anything but ``RpcError`` is an uncaught server error).  ``calls`` counts method names.
    """

    def __init__(self, dialect: str, handlers: dict[str, Handler], calls: Counter[str],
                 reorder: str | None = None) -> None:
        if reorder not in REORDERINGS:
            raise ValueError(f"reorder_batches must be one of {REORDERINGS}, not {reorder!r}")
        self.handlers = handlers
        self.calls = calls
        self.reorder = reorder
        self._rng = random.Random(0)
        # 4.x: not found = no "result" key; 5.x: "result": null (@aztec/foundation 5.x `result ?? null`).
        self._not_found = b"}" if dialect == "4" else b',"result":null}'
        # Uncaught errors: -32600 up to 4.x, -32603 from 5.x (both HTTP 500 for a single call).
        self._internal_code = -32600 if dialect == "4" else -32603
        self._batch_fault = b"Invalid Request" if dialect == "4" else b"Internal error"

    def answer(self, item: Any, state: ChainState) -> tuple[bytes, bool]:
        """One response object for one request object; the flag is False for an error.

        An uncaught handler error propagates (``handle_body`` turns it into the dialect's fault).
        """
        if not isinstance(item, dict):
            return error_json(NULL_ID, -32600, "Invalid Request"), False
        id_json: bytes | None = None
        if "id" in item:
            rid = item["id"]
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int, float))):
                return error_json(NULL_ID, -32600, "Invalid Request: bad id"), False
            id_json = dumps(rid).encode()
        method = item.get("method")
        if not isinstance(method, str):
            return error_json(id_json, -32600, "Invalid Request: missing method"), False
        self.calls[method] += 1
        params = item.get("params")
        if params is None:
            params = []
        elif not isinstance(params, list):
            return error_json(id_json, -32701, "Invalid params: params must be an array"), False
        handler = self.handlers.get(method)
        if handler is None:
            return error_json(id_json, -32601, f"Method not found: {method}"), False
        try:
            result = handler(params, state)
        except RpcError as e:
            return error_json(id_json, e.code, e.message), False
        if result is None:
            return head(id_json) + self._not_found, True
        return head(id_json) + b',"result":' + result + b"}", True

    def _batch_item(self, item: Any, state: ChainState) -> bytes:
        try:
            return self.answer(item, state)[0]
        except Exception:  # noqa: BLE001 - a rejected item of Promise.allSettled in the real server
            return b'{"jsonrpc":"2.0","error":{"code":%d,"message":"%s"},"id":null}' % (
                self._internal_code, self._batch_fault)

    def handle_body(self, body: bytes, state: ChainState) -> tuple[int, bytes]:
        """Answer one JSON-RPC HTTP body (single or batch) at one chain state: ``(HTTP status, bytes)``."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as e:
            return 400, error_json(NULL_ID, -32700, f"Parse error: {e}")
        if isinstance(parsed, list):
            if not parsed:
                return 400, error_json(NULL_ID, -32600, "Invalid Request: empty batch")
            if len(parsed) > MAX_BATCH:
                return 400, error_json(NULL_ID, -32600, f"Batch request exceeds maximum allowed size of {MAX_BATCH}")
            answers = [self._batch_item(item, state) for item in parsed]
            if self.reorder == "reverse":
                answers.reverse()
            elif self.reorder == "shuffle" and len(answers) > 1:
                order = list(range(len(answers)))
                self._rng.shuffle(order)
                if order == sorted(order):  # a shuffle that happens to keep the order is no test
                    order = order[1:] + order[:1]
                answers = [answers[i] for i in order]
            return 200, b"[" + b",".join(answers) + b"]"
        try:
            out, ok = self.answer(parsed, state)
        except Exception as e:  # noqa: BLE001 - the server's exception handler: HTTP 500, id null
            return 500, error_json(NULL_ID, self._internal_code, str(e) or "Internal error")
        return (200 if ok else 400), out


def accepts_gzip(header: bytes | None) -> bool:
    """True when ``Accept-Encoding`` lists gzip with a non-zero quality."""
    if not header:
        return False
    for part in header.lower().split(b","):
        coding, *options = part.split(b";")
        if coding.strip() != b"gzip":
            continue
        for option in options:
            key, _, value = option.partition(b"=")
            if key.strip() == b"q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def inflate(data: bytes) -> bytes | None:
    """Decompress a gzip/deflate request body; None when it inflates beyond ``MAX_BODY``."""
    decompressor = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib header, auto-detected
    out = decompressor.decompress(data, MAX_BODY + 1)
    if len(out) > MAX_BODY:
        return None
    if not decompressor.eof:
        raise zlib.error("truncated compressed body")
    return out
