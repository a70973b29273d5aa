"""Pure: JSON-RPC answer items as bytes, for answers assembled from the cache and several sources.

A cached or shared answer is stored without its id (callers sharing it use their own ids), and
each item is rebuilt by concatenating bytes, not by serialising a whole document again: a 2 KB
block is copied, not re-encoded, on every hit.
"""
from __future__ import annotations

from typing import Any, Iterable

from sentinel_proxy.proxy.coalesce import Entry
from sentinel_proxy.core.jsonrpc import encode

_KINDS = {b"R": "result", b"E": "error", b"N": "missing"}
_TAGS = {kind: tag for tag, kind in _KINDS.items()}


def store_value(entry: Entry) -> bytes:
    """How an entry is kept in a cache: one tag byte, then the raw JSON."""
    return _TAGS[entry.kind] + entry.raw


def entry_from_store(value: bytes) -> Entry | None:
    """The entry a cache value holds, or None for a value this version cannot read."""
    kind = _KINDS.get(value[:1])
    return None if kind is None else Entry(kind, value[1:])


def entry_of(item: Any) -> Entry:
    """One upstream answer item, without its id. No ``result`` and no ``error`` means not found."""
    if isinstance(item, dict):
        if "error" in item:
            return Entry("error", encode(item["error"]))
        if "result" in item:
            return Entry("result", encode(item["result"]))
    return Entry("missing")


def item_bytes(request_id: Any, entry: Entry) -> bytes:
    """The caller's item: its own id, the shared answer, and no ``result`` key when not found."""
    head = b'{"jsonrpc":"2.0","id":' + encode(request_id)
    if entry.kind == "result":
        return head + b',"result":' + entry.raw + b"}"
    if entry.kind == "error":
        return head + b',"error":' + entry.raw + b"}"
    return head + b"}"


def assemble(items: Iterable[bytes], is_batch: bool) -> bytes:
    parts = list(items)
    return b"[" + b",".join(parts) + b"]" if is_batch else parts[0]
