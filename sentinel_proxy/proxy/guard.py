"""Pure: what a caller sent, checked and parsed once, or refused with the reason (no I/O).

Bodies pass through as bytes: the request is parsed once to validate it and apply the method
policy, but what goes upstream is the caller's own body (and what comes back is the node's own
answer, checked against the request), except when some batch items were refused locally, in
which case only the allowed items go upstream (their own bytes, as the caller wrote them) and the
answers are merged back in the caller's order.
"""
from __future__ import annotations

import zlib

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core import routing
from sentinel_proxy.proxy.values import Inbound, Limits, Plan, Reply, error_reply

_JSON = b"application/json"


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


def decode_body(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` for validation, refusing anything that inflates past ``limit``."""
    coding = (encoding or b"identity").strip().lower()
    if coding == b"identity":
        return body
    if coding not in (b"gzip", b"deflate"):
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST, f"Unsupported Content-Encoding: {coding.decode('latin-1')}")
    wbits = 16 + zlib.MAX_WBITS if coding == b"gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise jsonrpc.RequestError(jsonrpc.PARSE_ERROR, f"Parse error: body is not valid {coding.decode()}") from None
    if len(plain) > limit:
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST, f"Request body exceeds {limit} bytes",
                                   http_status=413)
    return plain


def refuse_unavailable(parsed: jsonrpc.ParsedRequest, floor: int | None) -> jsonrpc.ParsedRequest:
    """Answer calls about blocks no eligible node keeps with a clear error, not a node's failure.

    ``floor`` is the oldest block some eligible node of the route keeps (0 or None: no limit).
    """
    if not floor:
        return parsed
    late: dict[int, tuple[jsonrpc.Call, str]] = {}
    for call in parsed.calls:
        block = call.block
        if block is not None and block < floor:
            late[call.position] = call, routing.unavailable_error(call, block, floor)["error"]["message"]
    if not late:
        return parsed
    if not parsed.is_batch:
        call, message = late[0]
        raise jsonrpc.RequestError(jsonrpc.BLOCK_UNAVAILABLE, message, call.id)
    refused = dict(parsed.refused)
    for position, (call, message) in late.items():
        refused[position] = jsonrpc.error_bytes(call.id, jsonrpc.BLOCK_UNAVAILABLE, message)
    return jsonrpc.ParsedRequest(True, tuple(c for c in parsed.calls if c.position not in late), refused, parsed.text)


def check(inbound: Inbound, limits: Limits, floor: int | None) -> jsonrpc.ParsedRequest | Reply:
    """The calls worth sending on, or the reply that refuses the request.

    A batch whose every item was refused is answered here (200, the items' own errors): nothing
    in it needs a node.
    """
    headers = inbound.headers
    content_type = headers.get(b"content-type")
    if content_type != _JSON and _media_type(content_type) != _JSON:
        return error_reply(400, jsonrpc.INVALID_REQUEST, "Content-Type must be application/json")
    if inbound.body_too_large:
        return error_reply(413, jsonrpc.INVALID_REQUEST, f"Request body exceeds {limits.max_body} bytes")
    body = inbound.body
    content_encoding = headers.get(b"content-encoding")
    try:
        if content_encoding is not None:
            body = decode_body(body, content_encoding, limits.max_body)
        parsed = jsonrpc.parse_request(body, limits.max_batch, limits.policies.get(inbound.route, jsonrpc.DEFAULT_POLICY))
        parsed = refuse_unavailable(parsed, floor)
    except jsonrpc.RequestError as refusal:
        return Reply(refusal.http_status, refusal.body())
    if not parsed.calls:
        return Reply(200, jsonrpc.merge_batch(parsed, {}), batch=parsed.size)
    return parsed


def plan(inbound: Inbound, parsed: jsonrpc.ParsedRequest, limits: Limits, deadline: float) -> Plan:
    """What goes upstream: the caller's own bytes, or only the allowed items when some were refused."""
    if parsed.refused:
        # Only the allowed items go upstream, as the caller wrote them; the answer is merged with
        # the refused items, so it must come back uncompressed.
        body = jsonrpc.allowed_body(parsed)
        plain = True
    else:
        body = inbound.body
        plain = False
    calls = parsed.calls
    return Plan(inbound.route, parsed, body, inbound.headers, plain, inbound.caller.request_id, deadline, limits,
                jsonrpc.oldest_block(calls), jsonrpc.safe_to_repeat(calls))
