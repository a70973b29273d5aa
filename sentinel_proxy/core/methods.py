"""Pure: the one table of the JSON-RPC methods the gateway knows, in both live Aztec dialects.

Each row is a *canonical* method name (the part after the namespace, e.g. ``getBlock``) with
everything the request path decides from a method name alone:

- its cache class (:class:`Rule`, read by ``core/cache_policy.py``),
- whether its first param is a block (``block``: any block parameter form; ``range``:
  ``(from, limit)``), read by ``core/routing.py`` for archive routing,
- whether it is safe to repeat (``sendTx`` is never repeated, hedged or retried once sent),
- its rate cost (``stores/ratelimit.py``),
- its metric label (:func:`metric_label`).

The wire names: 4.x sends ``node_<name>``, 5.x ``aztec_<name>``, and a 5.x node serves ``node_*`` as
the same handlers (docs/aztec-protocol.md), so both namespaces map to one row; ``p2p_*`` methods
have rows of their own flagged ``p2p``. Like the Aztec server (JavaScript ``name.split('_', 2)``),
anything after a second ``_`` is ignored when finding the row: ``node_sendTx_x`` *is* a
``sendTx`` to the node, so it is unsafe to repeat too. The namespace itself is case-sensitive on
the node (``NODE_getBlock`` is -32601), so only the exact spellings map to a row.

Renamed methods keep one meaning (:data:`SAME_AS`, :func:`meaning`): 5.x ``getChainTips`` is 4.x
``getL2Tips``; 5.x ``getBlockNumber(tag)`` is 4.x ``getProvenBlockNumber`` /
``getCheckpointedBlockNumber`` by tag. Their answers still get separate cache keys (the wire names
differ, and a mixed fleet answers each name in its own dialect).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from enum import StrEnum
from typing import Any

#: Namespaces whose methods share one row per canonical name.
NODE_NAMESPACES = ("node", "aztec")
P2P_NAMESPACE = "p2p"
#: Refused whatever METHOD_ALLOW says, in any case (``NODEADMIN_x``, ``aztecadmin_x``): the admin
#: and debug APIs (``addLegacyNodeRpcNamespaces`` serves ``nodeAdmin_*`` as ``aztecAdmin_*``, and
#: ``nodeDebug_*`` as ``aztecDebug_*``).
REFUSED_NAMESPACES = frozenset({"nodeadmin", "aztecadmin", "nodedebug", "aztecdebug"})
#: The bounded metric label of any method outside the table.
OTHER = "other"


class Rule(StrEnum):
    """How a method's answer may be cached (the second column of docs/caching.md)."""

    #: Per-node state, mempool, writes, simulations: never looked up, never stored.
    NEVER = "never"
    #: Moving values (tips, fees) and chain constants: kept ``volatile_ttl`` seconds.
    VOLATILE = "volatile"
    #: First param a block parameter (any form): immutable for a number at or below the finalized
    #: tip, or for a hit on a hash whose block number is finalized; else volatile.
    BLOCK = "block"
    #: First param a block, the answer is state at that block: immutable for a number at or below
    #: the finalized tip; else volatile (a hash does not say its height in the answer).
    STATE_AT_BLOCK = "state-at-block"
    #: ``(from, limit)``: immutable when from+limit-1 is finalized and the page is full; else volatile.
    BLOCK_RANGE = "block-range"
    #: By block hash: immutable on a hit whose block number is finalized; else volatile.
    BLOCK_BY_HASH = "block-by-hash"
    #: Immutable when ``status`` is ``finalized``; else volatile.
    RECEIPT = "receipt"
    #: Immutable when ``l2BlockNumber`` is finalized; else volatile.
    TX_EFFECT = "tx-effect"
    #: Content-addressed: immutable on a hit; a not-found is volatile.
    CONTENT_ADDRESSED = "content-addressed"


#: Routing classes: what the first param names.
BLOCK = "block"
RANGE = "range"


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    cache: Rule
    #: ``"block"``, ``"range"`` or None (the call names no block).
    routing: str | None = None
    #: False for a call with effects (sent to a second node only if the first never got it).
    safe: bool = True
    cost: float = 1.0
    #: Served in the node namespaces (``node_``, ``aztec_``).
    node: bool = True
    #: Served in the ``p2p_`` namespace.
    p2p: bool = False


def _rows(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


N, V = Rule.NEVER, Rule.VOLATILE
S = Rule.STATE_AT_BLOCK

#: Canonical name -> row. A method not listed here is never cached, names no block, costs 1,
#: is safe to repeat and is counted as "other".
TABLE: dict[str, Method] = _rows(
    # Per node, mempool, writes and simulations.
    Method("isReady", N),
    Method("getNodeVersion", N),
    Method("getEncodedEnr", N, p2p=True),
    Method("getValidatorsStats", N, cost=20.0),
    Method("getValidatorStats", N, cost=5.0),
    Method("getWorldStateSyncStatus", N),
    Method("getPendingTxs", N, cost=5.0, p2p=True),
    Method("getPendingTxCount", N, p2p=True),
    Method("getTxByHash", N, p2p=True),
    Method("getTxsByHash", N, cost=2.0),
    Method("sendTx", N, safe=False, cost=2.0),
    Method("isValidTx", N, cost=5.0),
    Method("simulatePublicCalls", N, cost=5.0),
    Method("registerContractFunctionSignatures", N),
    Method("getPeers", N, p2p=True),  # 5.x (newest revision) also serves it in the node namespace
    Method("getTxStatus", N, node=False, p2p=True),
    Method("getAttestationsForSlot", N, node=False, p2p=True),
    # Tips, fees and chain constants.
    Method("getBlockNumber", V),
    Method("getProvenBlockNumber", V),
    Method("getCheckpointedBlockNumber", V),
    Method("getL2Tips", V),
    Method("getChainTips", V),
    Method("getCheckpointNumber", V),
    Method("getCurrentMinFees", V),
    Method("getCurrentBaseFees", V),
    Method("getMaxPriorityFees", V),
    Method("getNodeInfo", V),
    Method("getChainId", V),
    Method("getVersion", V),
    Method("getL1ContractAddresses", V),
    Method("getProtocolContractAddresses", V),
    Method("getContract", V),
    # Blocks.
    Method("getBlock", Rule.BLOCK, BLOCK),
    Method("getBlockHeader", Rule.BLOCK, BLOCK),
    Method("getBlockData", Rule.BLOCK, BLOCK),
    Method("getBlockByHash", Rule.BLOCK_BY_HASH),
    Method("getBlocks", Rule.BLOCK_RANGE, RANGE, cost=5.0),
    # Transactions.
    Method("getTxReceipt", Rule.RECEIPT),
    Method("getTxEffect", Rule.TX_EFFECT),
    # World state at a block.
    Method("getPublicStorageAt", S, BLOCK),
    Method("findLeavesIndexes", S, BLOCK),
    Method("getNullifierMembershipWitness", S, BLOCK),
    Method("getLowNullifierMembershipWitness", S, BLOCK),
    Method("getPublicDataWitness", S, BLOCK),
    Method("getPublicDataTreeWitness", S, BLOCK),
    Method("getArchiveMembershipWitness", S, BLOCK),
    Method("getNoteHashMembershipWitness", S, BLOCK),
    Method("getL1ToL2MessageMembershipWitness", S, BLOCK),
    Method("getBlockHashMembershipWitness", S, BLOCK),
    Method("getArchiveSiblingPath", S, BLOCK),
    Method("getNoteHashSiblingPath", S, BLOCK),
    Method("getNullifierSiblingPath", S, BLOCK),
    Method("getPublicDataSiblingPath", S, BLOCK),
    Method("getL1ToL2MessageSiblingPath", S, BLOCK),
    # Content-addressed.
    Method("getContractClass", Rule.CONTENT_ADDRESSED),
    # Known, not cached (yet): logs, checkpoints, messages.
    Method("getPublicLogs", N, cost=3.0),
    Method("getPublicLogsByTags", N, cost=3.0),
    Method("getContractClassLogs", N, cost=3.0),
    Method("getLogsByTags", N),
    Method("getPrivateLogsByTags", N),
    Method("getPublicLogsByTagsFromContract", N),
    Method("getPrivateLogs", N),
    Method("getBlockByArchive", N),
    Method("getPublishedBlocks", N),
    Method("getCheckpoint", N),
    Method("getCheckpoints", N),
    Method("getCheckpointsData", N),
    Method("getCheckpointedBlocks", N),
    Method("getL2ToL1Messages", N),
    Method("getL1ToL2MessageBlock", N),
    Method("isL1ToL2MessageSynced", N),
    Method("getAllowedPublicSetup", N),
)

#: 4.x names and the 5.x meaning they have: (canonical name, the tag of ``getBlockNumber``).
SAME_AS: dict[str, tuple[str, str | None]] = {
    "getL2Tips": ("getChainTips", None),
    "getProvenBlockNumber": ("getBlockNumber", "proven"),
    "getCheckpointedBlockNumber": ("getBlockNumber", "checkpointed"),
}
_TAGS = frozenset({"proposed", "checkpointed", "proven", "finalized"})


def split(method: str) -> tuple[str, str]:
    """``(namespace, name)`` as the Aztec server reads them: text after a second ``_`` dropped."""
    parts = method.split("_", 2)
    return parts[0], parts[1] if len(parts) > 1 else ""


def refused_namespace(method: str) -> bool:
    """True for the admin and debug namespaces, in any case."""
    return method.split("_", 1)[0].lower() in REFUSED_NAMESPACES


@lru_cache(maxsize=4096)
def lookup(method: str) -> Method | None:
    """The table row of a wire method name (``node_getBlock``, ``aztec_getBlock``, ``p2p_getPeers``).
    Remembered: every request asks several times (safety, cache rule, method class), and callers
    use a few dozen names; the bound keeps made-up names from growing it."""
    namespace, name = split(method)
    row = TABLE.get(name)
    if row is None:
        return None
    if namespace in NODE_NAMESPACES:
        return row if row.node else None
    if namespace == P2P_NAMESPACE:
        return row if row.p2p else None
    return None


def cache_rule(method: str) -> Rule:
    row = lookup(method)
    return Rule.NEVER if row is None else row.cache


def routing_class(method: str) -> str | None:
    row = lookup(method)
    return None if row is None else row.routing


def safe(method: str) -> bool:
    """False for a call with effects. A method outside the table is safe (as before): the table
    lists every write the nodes have."""
    row = lookup(method)
    return True if row is None else row.safe


def cost(method: str) -> float:
    row = lookup(method)
    return 1.0 if row is None else row.cost


def metric_label(method: str) -> str:
    """``namespace_name`` for a method in the table (exact spelling only, so the set of labels is
    bounded: 2 namespaces x rows + p2p rows), else ``"other"``."""
    row = lookup(method)
    if row is None:
        return OTHER
    namespace, name = split(method)
    label = f"{namespace}_{name}"
    return label if label == method else OTHER


def metric_labels() -> frozenset[str]:
    """Every label :func:`metric_label` can give besides ``"other"``."""
    labels = set()
    for row in TABLE.values():
        if row.node:
            labels.update(f"{ns}_{row.name}" for ns in NODE_NAMESPACES)
        if row.p2p:
            labels.add(f"{P2P_NAMESPACE}_{row.name}")
    return frozenset(labels)


def meaning(method: str, params: Any = ()) -> tuple[str, str | None] | None:
    """What a call asks, whatever the dialect: ``("getBlockNumber", "proven")`` for 4.x
    ``node_getProvenBlockNumber`` and 5.x ``aztec_getBlockNumber("proven")`` alike;
    ``("getChainTips", None)`` for ``getL2Tips`` and ``getChainTips``. None outside the table."""
    row = lookup(method)
    if row is None:
        return None
    if row.name in SAME_AS:
        return SAME_AS[row.name]
    if row.name == "getBlockNumber":
        tag = params[0] if isinstance(params, list) and params else None
        if tag is None or tag == "latest":
            return "getBlockNumber", "proposed"
        return "getBlockNumber", tag if tag in _TAGS else None
    return row.name, None


def full_names(rule: Rule | None = None) -> dict[str, Rule]:
    """Every wire name of the table (node_, aztec_ and p2p_), with its cache rule."""
    names: dict[str, Rule] = {}
    for row in TABLE.values():
        if rule is not None and row.cache is not rule:
            continue
        if row.node:
            for ns in NODE_NAMESPACES:
                names[f"{ns}_{row.name}"] = row.cache
        if row.p2p:
            names[f"{P2P_NAMESPACE}_{row.name}"] = row.cache
    return names


# -- Block parameters


@dataclass(frozen=True, slots=True)
class BlockRef:
    """What a block parameter names: ``kind`` is ``number`` (``number`` set), ``hash`` (a full
    32-byte hash, or any hex/decimal string the node reads as a field element), ``archive``, ``tag``
    (``latest`` is ``proposed``) or ``invalid`` (the node refuses it)."""

    kind: str
    number: int | None = None
    value: str | None = None


_HEX = frozenset("0123456789abcdefABCDEF")
_SELECTORS = ("number", "hash", "archive", "tag")
INVALID = BlockRef("invalid")


def _number(value: Any, decimal_string: bool) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if decimal_string and isinstance(value, str) and value.isascii() and value.isdecimal():
        return int(value)
    return None


def _hash_like(value: str) -> bool:
    """The hash schema's test (``/^(0x)?[0-9a-fA-F]*$/``): ``"5"`` is a hash (the field element 5)."""
    body = value[2:] if value.startswith("0x") else value
    return all(c in _HEX for c in body)


def block_ref(param: Any) -> BlockRef:
    """A block parameter in any form (docs/aztec-protocol.md, "Block parameters").

    A JSON number is that block; a bare string is ``latest``, a tag, or a hash (a decimal string
    such as ``"5"`` is the field element 5, i.e. a hash, in both dialects); an object holds one
    selector (``{number}`` with a number or a decimal string, ``{hash}``, ``{archive}``, ``{tag}``)
    or the anchored ``{number, hash}`` (block ``number``, if its hash agrees). Other keys are
    ignored (the lenient schema strips them); two selectors but number+hash are invalid.
    """
    number = _number(param, False)
    if number is not None:
        return BlockRef("number", number)
    if isinstance(param, str):
        if param == "latest":
            return BlockRef("tag", value="proposed")
        if param in _TAGS:
            return BlockRef("tag", value=param)
        return BlockRef("hash", value=param) if _hash_like(param) else INVALID
    if isinstance(param, dict):
        present = [key for key in _SELECTORS if key in param]
        if present == ["number", "hash"] or present == ["number"]:
            number = _number(param["number"], True)
            return BlockRef("number", number) if number is not None else INVALID
        if len(present) != 1:
            return INVALID
        key = present[0]
        value = param[key]
        if key == "tag":
            return BlockRef("tag", value=value) if value in _TAGS else INVALID
        if isinstance(value, str) and _hash_like(value):
            return BlockRef(key, value=value)
    return INVALID


def first_param(params: Any) -> Any:
    if isinstance(params, list) and params:
        return params[0]
    return None


def block_of(method: str, params: Any) -> BlockRef | None:
    """What the call's block param names, for a method whose first param is a block; None else
    (and for a call without one, which means the proposed tip)."""
    if routing_class(method) != BLOCK:
        return None
    if not isinstance(params, list) or not params:
        return None
    return block_ref(params[0])


def range_of(method: str, params: Any) -> tuple[int, int] | None:
    """``(from, limit)`` of a range call (``getBlocks``): numbers, or decimal strings (5.x
    ``BlockNumberPositiveSchema``), both at least 1."""
    if routing_class(method) != RANGE or not isinstance(params, list) or len(params) < 2:
        return None
    start, limit = _number(params[0], True), _number(params[1], True)
    if start is None or limit is None or start < 1 or limit < 1:
        return None
    return start, limit


def block_number(method: str, params: Any) -> int | None:
    """The block height a call reads at (the oldest of a range), when its params name one."""
    ref = block_of(method, params)
    if ref is not None:
        return ref.number if ref.kind == "number" else None
    if routing_class(method) == RANGE:
        return _number(first_param(params), True)
    return None
