"""Pure: what a caller sent, checked and parsed once, or refused with the reason (no I/O).

The request is parsed once to validate it and apply the method policy, and what goes upstream is
what was validated: the caller's own bytes, decoded from ``Content-Encoding`` (a node never sees
a body the gateway did not read whole, so a caller's broken gzip cannot make a healthy node fail
and charge its breaker). When some batch items were refused locally only the allowed items go
upstream (their own bytes, as the caller wrote them) and the answers are merged back in the
caller's order. What comes back is the node's own answer, checked against the request.
"""
from __future__ import annotations

import zlib

from sentinel_proxy.core import jsonrpc
from sentinel_proxy.core import routing
from sentinel_proxy.proxy.values import Inbound, Limits, Plan, Reply, error_reply

_JSON = b"application/json"


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


def decode_body(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Undo ``Content-Encoding``, refusing what the gateway cannot vouch for.

    Exactly ``identity`` and ``gzip`` (any case, surrounding blanks): one gzip member read to its
    end, with nothing after it, inflated to at most ``limit`` bytes. Anything else (``deflate``,
    ``br``, ``gzip, gzip``, several headers) is refused: a node would fail on it.
    """
    coding = encoding.strip().lower()
    if coding == b"identity":
        return body
    if coding != b"gzip":
        shown = encoding.decode("latin-1")[:64]
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST,
                                   f"Unsupported Content-Encoding: {shown} (only gzip and identity are accepted)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise jsonrpc.RequestError(jsonrpc.PARSE_ERROR, "Parse error: the body is not valid gzip") from None
    if len(plain) > limit:
        raise jsonrpc.RequestError(jsonrpc.INVALID_REQUEST, f"Request body exceeds {limit} bytes",
                                   http_status=413)
    if not inflater.eof:
        raise jsonrpc.RequestError(jsonrpc.PARSE_ERROR, "Parse error: the gzip body is cut short")
    if inflater.unused_data:
        raise jsonrpc.RequestError(jsonrpc.PARSE_ERROR, "Parse error: data after the end of the gzip body")
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
    return jsonrpc.ParsedRequest(True, tuple(c for c in parsed.calls if c.position not in late), refused, parsed.text,
                                 parsed.refused_methods + tuple(call.method for call, _ in late.values()))


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
        reply = Reply(refusal.http_status, refusal.body())
        if refusal.raw_id == jsonrpc.NULL_ID and refusal.code != jsonrpc.PARSE_ERROR:
            # Refused as a whole (a batch too large, an invalid id): each call's id, when it can be told.
            ids = jsonrpc.ids_in(body)
            if ids is not None:
                reply = reply.readdressed(jsonrpc.refusal_body(*ids, refusal.code, refusal.message))
        return reply
    if not parsed.calls:
        return Reply(200, jsonrpc.merge_batch(parsed, {}), batch=parsed.size, refused=parsed.refused_methods)
    return parsed


def addressed(reply: Reply, parsed: jsonrpc.ParsedRequest) -> Reply:
    """The gateway's own error under each caller's id as sent, an array for a batch (the Aztec
    client matches items by position); items refused locally keep their own errors."""
    refusal = reply.refusal
    if refusal is None:
        return reply
    return reply.readdressed(jsonrpc.refusal_of(parsed, *refusal))


def addressed_unparsed(reply: Reply, inbound: Inbound, max_body: int) -> Reply:
    """:func:`addressed` for a request refused before it was parsed (overloaded, unknown key, not
    JSON): the ids are read from the body, when it can be read far enough to tell them."""
    refusal = reply.refusal
    if refusal is None or inbound.body_too_large:
        return reply
    body = inbound.body
    encoding = inbound.headers.get(b"content-encoding")
    try:
        if encoding is not None:
            body = decode_body(body, encoding, max_body)
    except jsonrpc.RequestError:
        return reply
    ids = jsonrpc.ids_in(body)
    return reply if ids is None else reply.readdressed(jsonrpc.refusal_body(*ids, *refusal))


def plan(inbound: Inbound, parsed: jsonrpc.ParsedRequest, limits: Limits, deadline: float) -> Plan:
    """What goes upstream: the body as validated (decoded), or only the allowed items when some
    were refused."""
    if parsed.refused:
        # Only the allowed items go upstream, as the caller wrote them; the answer is merged with
        # the refused items, so it must come back uncompressed.
        body = jsonrpc.allowed_body(parsed)
        plain = True
    else:
        body = parsed.text
        plain = False
    calls = parsed.calls
    return Plan(inbound.route, parsed, body, inbound.headers, plain, inbound.caller.request_id, deadline, limits,
                jsonrpc.oldest_block(calls), jsonrpc.safe_to_repeat(calls))
