"""Pure: which answers may be cached, under which key and for how long (no Twisted, no I/O).

The rules follow ../shared/docs/aztec-node-api.md and are a table (:data:`RULES`, method -> rule)
that docs/caching.md mirrors row for row. Caching is decided twice:

1. :func:`decide` before the call, from the method and its params: whether to look it up at all,
   under which key, and whether the params alone prove the answer final (a block number at or
   below the finalized tip);
2. :func:`storable` after the answer: some answers prove themselves final (a receipt whose status
   is ``finalized``, a block fetched by hash whose number is finalized), others must not be kept
   (errors, not-found for long, a short ``getBlocks`` page).

"Finalized" is never one node's word: :func:`finalized_tip` takes the height that a majority of
the healthy nodes report as finalized.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any, Iterable, NamedTuple

import msgspec

from sentinel_proxy.core import methods
from sentinel_proxy.core.methods import Rule

#: Default lifetime of a volatile entry: below one 4.x block time (several blocks per 72 s slot),
#: so a cached tip is at most about one block old.
DEFAULT_VOLATILE_TTL = 1.0
#: What :func:`storable` returns for "keep until evicted"; both stores take it as no expiry.
FOREVER = math.inf

IMMUTABLE = "immutable"
VOLATILE = "volatile"
NEVER = "never"


#: Method -> rule for every wire name of the method table (core/methods.py: ``node_``, ``aztec_``
#: and ``p2p_`` spellings). A method not listed here is never cached (the method list changes
#: between node versions; an unknown method may be per node or a write). Only the exact spellings
#: are cached: ``node_getBlock_x`` (served by the node as ``getBlock``) is not, which keeps every
#: cached method name free of ``:`` (see :func:`cache_key`).
RULES: dict[str, Rule] = methods.full_names()

_BLOCK_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_canonical = msgspec.json.Encoder(order="sorted").encode
_canonical_slow = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


class Decision(NamedTuple):
    """What to do with a call before it is answered.

    ``kind``: ``immutable`` (the params prove the answer final), ``volatile`` (cache it briefly;
    :func:`storable` may still find the answer final) or ``never`` (do not look up, do not store).
    ``ttl``: None for immutable (kept until evicted), ``volatile_ttl`` for volatile, 0 for never.
    ``key``: the cache key; empty for never, so a large write (``node_sendTx``) is not serialised
    for nothing. A named tuple, not a frozen dataclass: one is made per call, at half the cost.
    """

    kind: str
    ttl: float | None
    key: bytes


NEVER_DECISION = Decision(NEVER, 0.0, b"")


def cache_key(method: str, params: Any, chain: Any = None) -> bytes:
    """The chain, ``method:`` and the params as canonical JSON (sorted keys, no whitespace, UTF-8;
    msgspec's, ~0.1 µs against ~1.3 µs for the standard library's).

    ``chain`` is the chain identity the gateway learned from its nodes (``(l1ChainId,
    rollupVersion)``), written first as a canonical JSON array (self-delimiting), so gateways on
    different chains sharing one store never read each other's entries; None writes no chain
    (the pure tests, and a cache stage not given the pool's chain).

    JSON types stay apart (``5`` is a block number, ``"5"`` a hash, ``{"number": 5}`` a third
    key: see docs/caching.md) and the call's ``id`` is not part of it, so callers with different
    ids share entries. Only methods of :data:`RULES` get a key, and none of their names holds a
    ``:``, so the method/params boundary is unambiguous. msgspec writes infinities (``1E400`` in a
    request) as ``null``: params whose key holds a ``null`` take the standard library's canonical
    form instead (``Infinity`` stays apart from ``null``); neither form can equal the other for
    different params.
    """
    prefix = b"" if chain is None else _chain_prefix(tuple(chain))
    encoded = _canonical(params)
    if b"null" in encoded:
        return prefix + f"{method}:{_canonical_slow(params)}".encode()
    return prefix + method.encode() + b":" + encoded


@lru_cache(maxsize=16)
def _chain_prefix(chain: tuple[Any, ...]) -> bytes:
    """A chain identity as the keys' canonical JSON array: one per chain, worked out once."""
    return _canonical(list(chain))


def _height(value: Any) -> int | None:
    """A block height as a node writes it (a JSON number; 2.x/3.x may use a decimal string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdecimal():
        return int(value)
    return None


def _finalized_of(tips: Any) -> int | None:
    """The finalized height in one ``node_getL2Tips`` result (4.x or 2.x/3.x shape), else None."""
    if not isinstance(tips, dict):
        return None
    finalized = tips.get("finalized")
    if not isinstance(finalized, dict):
        return None
    block = finalized.get("block", finalized)  # 4.x: {block: {number, hash}, checkpoint: ...}
    return _height(block.get("number")) if isinstance(block, dict) else None


def finalized_tip(tips: Iterable[Any]) -> int | None:
    """The highest height that more than half of the given nodes report as finalized.

    ``tips`` holds one ``node_getL2Tips`` result per healthy node. An unreadable result still
    counts as a node (one that vouches for nothing), so garbage cannot turn a minority into a
    majority. With one node, that node is the majority; with several, one node's claim alone
    never moves the tip.
    """
    reports = list(tips)
    needed = len(reports) // 2 + 1
    heights = sorted((h for h in map(_finalized_of, reports) if h is not None), reverse=True)
    return heights[needed - 1] if len(heights) >= needed else None


def _block_number_param(params: Any) -> int | None:
    """The height the first param names (a JSON number, ``{number}``, ``{number, hash}``); a bare
    decimal string is a hash, a tag or ``"latest"`` a moving block, neither a height."""
    if isinstance(params, list) and params:
        ref = methods.block_ref(params[0])
        if ref.kind == "number":
            return ref.number
    return None


def _block_hash_param(params: Any) -> bool:
    """True when the first param is a full block hash, bare or ``{hash}`` / ``{archive}`` (tags
    and ``"latest"`` never are): the answer then says whether its block is final."""
    if isinstance(params, list) and params:
        ref = methods.block_ref(params[0])
        return ref.kind in ("hash", "archive") and _BLOCK_HASH.fullmatch(ref.value or "") is not None
    return False


def _range_param(params: Any) -> tuple[int, int] | None:
    """``(from, limit)`` of a ``getBlocks`` call, when both are at least 1 (numbers or decimal strings)."""
    return methods.range_of("node_getBlocks", params)


def _final_by_params(rule: Rule, params: Any, finalized: int | None) -> bool:
    """True when the params alone pin the answer to finalized blocks."""
    if finalized is None:
        return False
    if rule is Rule.BLOCK or rule is Rule.STATE_AT_BLOCK:
        number = _block_number_param(params)
        return number is not None and number <= finalized
    if rule is Rule.BLOCK_RANGE:
        page = _range_param(params)
        return page is not None and page[0] + page[1] - 1 <= finalized
    return False


def _block_number_of(result: Any) -> int | None:
    """The number of a block or block header answer (``number``, or the header's globalVariables)."""
    if not isinstance(result, dict):
        return None
    number = _height(result.get("number"))
    if number is not None:
        return number
    header = result.get("header", result)
    variables = header.get("globalVariables") if isinstance(header, dict) else None
    return _height(variables.get("blockNumber")) if isinstance(variables, dict) else None


def _final_by_answer(rule: Rule, params: Any, result: Any, finalized: int | None) -> bool:
    """True when a (present) answer shows by itself that it can no longer change."""
    if rule is Rule.CONTENT_ADDRESSED:
        return True
    if rule is Rule.RECEIPT:
        return isinstance(result, dict) and result.get("status") == "finalized"
    if finalized is None:
        return False
    if rule is Rule.TX_EFFECT:
        number = _height(result.get("l2BlockNumber")) if isinstance(result, dict) else None
    elif rule is Rule.BLOCK_BY_HASH or (rule is Rule.BLOCK and _block_hash_param(params)):
        number = _block_number_of(result)
    else:
        return False
    return number is not None and number <= finalized


def _complete(rule: Rule, params: Any, result: Any) -> bool:
    """False for a ``getBlocks`` page shorter than asked: the node that sent it is behind."""
    if rule is Rule.BLOCK_RANGE:
        page = _range_param(params)
        return page is not None and isinstance(result, list) and len(result) == page[1]
    return True


def decide(method: str, params: Any, finalized: int | None,
           volatile_ttl: float = DEFAULT_VOLATILE_TTL, chain: Any = None) -> Decision:
    """The decision for a call; ``params`` is the request's ``params`` (``[]`` when absent);
    ``chain`` the chain identity the key carries (:func:`cache_key`).

    Tags (``proposed``, ``checkpointed``, ``proven``, ``finalized``, also as ``{tag}``) and
    ``"latest"`` name a moving block: volatile, never immutable by their params.

    A block number above the finalized tip is volatile, not never: its answer may still change
    (a reorg, a prune), but no more often than the tip that callers poll anyway.
    """
    rule = RULES.get(method, Rule.NEVER)
    if rule is Rule.NEVER:
        return NEVER_DECISION
    key = cache_key(method, params, chain)
    if _final_by_params(rule, params, finalized):
        return Decision(IMMUTABLE, None, key)
    return Decision(VOLATILE, volatile_ttl, key)


def storable(decision: Decision, method: str, params: Any, result_present: bool, result: Any,
             finalized: int | None, *, error: bool = False) -> float | None:
    """Seconds to keep this answer: :data:`FOREVER`, a volatile TTL, or None for "do not store".

    ``result_present`` is False for a not-found answer (no ``result`` key); a ``null`` result is
    not-found too (5.x), whatever ``result_present`` says; pass ``error=True``
    for an ``error`` answer, which is never stored. ``finalized`` is the current majority tip (it
    may have moved since :func:`decide`).

    Not-found is stored only for a volatile decision, and only for ``volatile_ttl``: a block or
    tx that does not exist yet will exist soon, and polling callers share one "not yet". When the
    params name finalized data, a not-found (or a short ``getBlocks`` page) comes from a node that
    is behind or broken, and is not passed on to other callers at all.
    """
    if error or decision.kind == NEVER:
        return None
    # 5.x writes not-found as ``"result": null``, 4.x as no ``result`` key: the same answer.
    result_present = result_present and result is not None
    rule = RULES.get(method, Rule.NEVER)
    if decision.kind == IMMUTABLE:
        return FOREVER if result_present and _complete(rule, params, result) else None
    if result_present and _final_by_answer(rule, params, result, finalized):
        return FOREVER
    ttl = decision.ttl
    return ttl if ttl is not None and ttl > 0 else None
