"""Pure: a node's answer checked against the request, and answer items as bytes.

**Matching** (:func:`match`). JSON-RPC lets a server answer a batch in any order, so a node's
items are attributed to calls by id, never by position. The answer must be a JSON array with
one object per call (a single call: one object), each carrying one of the request's ids, none
twice, none unknown, none missing; anything else (wrong length, extra, duplicate, unknown or
missing ids, garbage, truncated JSON) is :class:`BadAnswer`, the node failing. Ids compare by
:func:`~sentinel_proxy.core.jsonrpc.id_key` (text for strings, the 64-bit float value for
numbers: a JavaScript node writes ``1e2`` back as ``100``). Three JSON-RPC cases are answers too:

- a notification (a call without id) may get no item (the specification) or an item without an
  id (what the Aztec node writes); such items are placed at the notifications' positions;
- an error item with ``"id": null`` for a call whose id the node could not handle (the Aztec
  server's failed batch item) stands for one call left without an answer (in request order);
- an error object with a null or no id in place of the whole answer is the node refusing the
  request as a whole (invalid request, batch too large for it): passed on as it is.

An answer whose items are in request order and carry the caller's id bytes exactly is passed on
untouched (gzip and all). Otherwise the items are put in request order by concatenating the
node's own item bytes, and an item whose id the node spelled differently gets the caller's id
bytes back: the real Aztec client matches by position and compares ids.

**Items as bytes.** A cached or shared answer is stored without its id (callers sharing it use
their own ids), and each item is rebuilt by concatenating bytes, not by serialising a whole
document again: a 2 KB block is copied, not re-encoded, on every hit.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import msgspec
from msgspec import UNSET, Raw, UnsetType

from sentinel_proxy.core.jsonrpc import NULL_ID, NOT_AN_ID, Call, encode, id_key, item_head
from sentinel_proxy.proxy.coalesce import Entry

_KINDS = {b"R": "result", b"E": "error", b"N": "missing"}
_TAGS = {kind: tag for tag, kind in _KINDS.items()}
MISSING = Entry("missing")


class Answer(msgspec.Struct):
    """One item of a node's answer as msgspec reads it: the three members that matter, raw."""

    id: Union[Raw, UnsetType] = UNSET
    result: Union[Raw, UnsetType] = UNSET
    error: Union[Raw, UnsetType] = UNSET


_read_answer = msgspec.json.Decoder(Union[list[Answer], Answer]).decode
_read_items = msgspec.json.Decoder(list[Raw]).decode


class BadAnswer(Exception):
    """The node's answer does not answer the request (its message says how)."""


class Matched:
    """A node's answer checked against the request.

    ``items``: each call's answer item in request order (None: a notification the node did not
    answer), or None when the answer refuses the request as a whole. ``body``: the answer to pass
    on, None when it is the node's own bytes unchanged. ``pieces``: each call's item bytes by the
    call's position (only when asked for). ``errors``: some item (or the whole answer) is an error.
    """

    __slots__ = ("items", "body", "pieces", "errors")

    def __init__(self, items: list[Answer | None] | None, body: bytes | None, pieces: dict[int, Any] | None,
                 errors: bool):
        self.items = items
        self.body = body
        self.pieces = pieces
        self.errors = errors


def store_value(entry: Entry) -> bytes:
    """How an entry is kept in a cache: one tag byte, then the raw JSON."""
    return _TAGS[entry.kind] + entry.raw


def entry_from_store(value: bytes) -> Entry | None:
    """The entry a cache value holds, or None for a value this version cannot read."""
    kind = _KINDS.get(value[:1])
    return None if kind is None else Entry(kind, value[1:])


def entry_of(item: Any) -> Entry:
    """One answer item (:class:`Answer`, or a decoded dict), without its id. No ``result`` and no
    ``error`` means not found."""
    if type(item) is Answer:
        if item.error is not UNSET:
            return Entry("error", bytes(item.error))
        if item.result is not UNSET:
            return Entry("result", bytes(item.result))
        return MISSING
    if isinstance(item, dict):
        if "error" in item:
            return Entry("error", encode(item["error"]))
        if "result" in item:
            return Entry("result", encode(item["result"]))
    return MISSING


def item_bytes(raw_id: bytes | None, entry: Entry) -> bytes:
    """The caller's item: its own id bytes (None: no id, a notification), the shared answer, and
    no ``result`` key when not found."""
    kind = entry.kind
    if kind == "result":
        return b"".join((item_head(raw_id), b',"result":', entry.raw, b"}"))
    if kind == "error":
        return b"".join((item_head(raw_id), b',"error":', entry.raw, b"}"))
    return item_head(raw_id) + b"}"


def rebuilt(raw_id: bytes | None, item: Answer) -> bytes:
    """A node's item under the caller's id bytes: its result and error as the node wrote them."""
    parts = [item_head(raw_id)]
    if item.result is not UNSET:
        parts += (b',"result":', item.result)
    if item.error is not UNSET:
        parts += (b',"error":', item.error)
    parts.append(b"}")
    return b"".join(parts)


def _whole_refusal(item: Answer) -> bool:
    """An error with a null (or no) id and no result: the node refusing the request as a whole."""
    return item.error is not UNSET and item.result is UNSET and (item.id is UNSET or item.id == _NULL_RAW)


_NULL_RAW = Raw(NULL_ID)


def _same_id(item: Answer, call: Call) -> bool:
    """The node wrote back exactly the caller's id bytes (or no id for a notification)."""
    node_id = item.id
    if node_id is UNSET:
        return call.id is None
    return call.id is not None and bytes(node_id) == call.id


def match(text: bytes, calls: Sequence[Call], is_batch: bool, want_pieces: bool = False) -> Matched:
    """Check the node's (uncompressed) answer ``text`` against the ``calls`` it answers; raise
    :class:`BadAnswer` when it does not answer them (see the module's docstring)."""
    if all(call.id is None for call in calls) and not text.strip():
        # Only notifications, answered with nothing, as the JSON-RPC specification has it.
        return Matched([None] * len(calls), None, {} if want_pieces else None, False)
    try:
        document = _read_answer(text)
    except msgspec.ValidationError as exc:
        raise BadAnswer(f"not a JSON-RPC answer ({exc})") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadAnswer(f"not JSON ({exc})") from None
    if type(document) is Answer:
        if not is_batch:
            return _match_single(text, document, calls[0], want_pieces)
        if _whole_refusal(document):
            return Matched(None, None, None, True)
        raise BadAnswer("an object for a batch")
    if not is_batch:
        raise BadAnswer("an array for a single call")
    items: list[Answer] = document
    if len(items) == len(calls):
        errors = False
        for item, call in zip(items, calls):
            if not _same_id(item, call):
                break
            if item.error is not UNSET:
                errors = True
        else:  # in request order, every id as the caller wrote it: the node's bytes as they are
            pieces = None
            if want_pieces:
                pieces = {call.position: raw for call, raw in zip(calls, _read_items(text))}
            return Matched(items, None, pieces, errors)
    return _match_by_id(text, items, calls, want_pieces)


def _match_single(text: bytes, item: Answer, call: Call, want_pieces: bool) -> Matched:
    errors = item.error is not UNSET
    if _same_id(item, call):
        return Matched([item], None, {call.position: text} if want_pieces else None, errors)
    node_id = item.id
    if call.id is None:
        if node_id == _NULL_RAW:  # a notification's answer under a null id: written back without one
            body = rebuilt(None, item)
            return Matched([item], body, {call.position: body} if want_pieces else None, errors)
    elif node_id is not UNSET and id_key(bytes(node_id)) == call.key:
        body = rebuilt(call.id, item)
        return Matched([item], body, {call.position: body} if want_pieces else None, errors)
    if _whole_refusal(item):
        return Matched(None, None, None, True)
    raise BadAnswer("the answer's id is not the request's" if node_id is not UNSET else "an answer without an id")


def _match_by_id(text: bytes, items: list[Answer], calls: Sequence[Call], want_pieces: bool) -> Matched:
    """The slow path: attribute every item to a call by id, then put them in request order."""
    waiting: dict[Any, list[int]] = {}  # id -> indexes (into calls) of the calls with that id, in order
    notifications: list[int] = []
    for index, call in enumerate(calls):
        if call.id is None:
            notifications.append(index)
        else:
            waiting.setdefault(call.key, []).append(index)
    for indexes in waiting.values():
        indexes.reverse()  # popped from the end: the first call first
    notifications.reverse()
    chosen: list[int | None] = [None] * len(calls)  # call index -> item index
    stand_ins: list[int] = []
    errors = False
    for position, item in enumerate(items):
        if item.error is not UNSET:
            errors = True
        node_id = item.id
        if node_id is UNSET:
            if not notifications:
                raise BadAnswer("an answer item without an id")
            chosen[notifications.pop()] = position
            continue
        key = id_key(bytes(node_id))
        if key is NOT_AN_ID:
            raise BadAnswer("an answer item whose id is no string, finite number or null")
        indexes = waiting.get(key)
        if indexes:
            chosen[indexes.pop()] = position
        elif key is None and notifications:
            chosen[notifications.pop()] = position
        elif key is None and item.error is not UNSET and item.result is UNSET:
            stand_ins.append(position)
        elif key in waiting:
            raise BadAnswer(f"id {bytes(node_id).decode('utf-8', 'replace')} answered twice")
        else:
            raise BadAnswer(f"id {bytes(node_id).decode('utf-8', 'replace')[:64]} was not asked")
    unanswered = [index for indexes in waiting.values() for index in indexes]
    if len(unanswered) != len(stand_ins):
        if len(stand_ins) > len(unanswered):
            raise BadAnswer(f"{len(stand_ins) - len(unanswered)} error item(s) with a null id too many")
        raise BadAnswer(f"{len(unanswered) - len(stand_ins)} call(s) without an answer")
    unanswered.sort()
    for index, position in zip(unanswered, stand_ins):
        chosen[index] = position
    order = [position for position in chosen if position is not None]
    if order == list(range(len(items))) and all(
            _same_id(items[position], call) for call, position in zip(calls, chosen) if position is not None):
        # In order after all (a notification left unanswered): the node's bytes as they are.
        pieces = None
        if want_pieces:
            raws = _read_items(text)
            pieces = {call.position: raws[position] for call, position in zip(calls, chosen) if position is not None}
        return Matched([None if position is None else items[position] for position in chosen], None, pieces, errors)
    raws = _read_items(text)
    ordered: list[Answer | None] = []
    parts: list[Any] = []
    pieces: dict[int, Any] = {}
    for call, position in zip(calls, chosen):
        if position is None:
            ordered.append(None)
            continue
        item = items[position]
        ordered.append(item)
        piece = raws[position] if _same_id(item, call) else rebuilt(call.id, item)
        parts.append(piece)
        pieces[call.position] = piece
    return Matched(ordered, b"[" + b",".join(parts) + b"]", pieces if want_pieces else None, errors)
