"""The 5.x method handlers of a simulated node: ``aztec_*``, with ``node_*`` as legacy aliases.

What changed from 4.x (``docs/aztec-protocol.md``): ``getChainTips`` replaces ``getL2Tips``;
``getBlockNumber(tag?)`` replaces ``getProvenBlockNumber``/``getCheckpointedBlockNumber``; block
parameters take tags and objects; ``getBlock`` returns a ``BlockResponse`` (body only with
``includeTransactions``); new ``getBlockData``, ``getCheckpoint(s)``, ``getCheckpointsData``,
``getCheckpointNumber``, ``getPublicLogsByTags``; ``getBlockByHash``, ``getBlockHeader`` and
``getPublicLogs`` are gone; the pruned-state error is the 5.x world state's.
"""

from __future__ import annotations

from typing import Any

from sentinel_simnode.blocks import (
    block_data_json,
    block_response_json,
    checkpoint_data_json,
    checkpoint_response_json,
    log_result_json,
    tx_effect_json,
)
from sentinel_simnode.chain import (
    HEX_FIELD,
    ChainState,
    block_hash,
    block_number_for_archive,
    block_number_for_hash,
    block_number_for_log_tag,
    checkpoint_of,
    dumps,
    first_block_of_slot,
    tx_location,
)
from sentinel_simnode.methods4 import PEERS, NodeMethods
from sentinel_simnode.params5 import (
    BLOCK_TAGS,
    CHECKPOINT_TAGS,
    BlockRef,
    block_number,
    checkpoint_number,
    checkpoint_param,
    inspect_block_param,
    limit_param,
    options_param,
    parse_block_param,
    tag_param,
)
from sentinel_simnode.rpc import Handler, RpcError, param, params_error, tx_hash_param

NAMESPACES = ("aztec", "node")  # node_* is the legacy alias of aztec_* (nodeAdmin_*, nodeDebug_* likewise)
_BLOCK_OPTIONS = ("includeTransactions", "includeL1PublishInfo", "includeAttestations")
_CHECKPOINT_OPTIONS = ("includeBlocks", "includeL1PublishInfo", "includeAttestations")


def pruned_error_5(number: int, oldest: int) -> str:
    """A 5.x node asked for state below its oldest historic block (``@aztec/world-state`` 5.2.0,
    ``ServerWorldStateSynchronizer.getVerifiedSnapshot``)."""
    return (f"Unable to find leaf for block {number} in the archive tree: "
            f"world state history has been pruned to block {oldest}")


class NodeMethods5(NodeMethods):
    """The 5.x handlers of one ``SimulatedNode``; unchanged methods are the 4.x ones."""

    def table(self) -> dict[str, Handler]:
        methods: dict[str, Handler] = {
            "isReady": self.is_ready,
            "getBlockNumber": self.get_block_number,
            "getCheckpointNumber": self.get_checkpoint_number,
            "getChainTips": self.get_tips,
            "getWorldStateSyncStatus": lambda p, s: self.node.per_tip("sync", s, self.build_sync_status),
            "getCurrentMinFees": lambda p, s: self.node.per_tip("fees", s, self.build_min_fees),
            "getNodeInfo": lambda p, s: self.node.node_info,
            "getPeers": lambda p, s: PEERS,
            "getBlock": self.get_block,
            "getBlockData": self.get_block_data,
            "getBlocks": self.get_blocks,
            "getCheckpoint": self.get_checkpoint,
            "getCheckpoints": self.get_checkpoints,
            "getCheckpointsData": self.get_checkpoints_data,
            "getTxReceipt": self.get_tx_receipt,
            "getTxEffect": self.get_tx_effect,
            "getPublicStorageAt": self.get_public_storage_at,
            "getPublicLogsByTags": self.get_public_logs_by_tags,
            "getValidatorsStats": self.get_validators_stats,
        }
        table = {f"{ns}_{name}": h for ns in NAMESPACES for name, h in methods.items()}
        table["p2p_getPeers"] = lambda p, s: PEERS
        return table

    # -- numbers and blocks

    def tip_number(self, tag: str | None, state: ChainState) -> int:
        return {None: state.tip, "proposed": state.tip, "checkpointed": state.checkpointed,
                "proven": state.proven, "finalized": state.finalized}[tag]

    def get_block_number(self, params: list[Any], state: ChainState) -> bytes:
        return str(self.tip_number(tag_param(param(params, 0), BLOCK_TAGS), state)).encode()

    def get_checkpoint_number(self, params: list[Any], state: ChainState) -> bytes:
        tag = tag_param(param(params, 0), CHECKPOINT_TAGS) or "checkpointed"
        return str(checkpoint_of(self.tip_number(tag, state))).encode()

    def resolve(self, ref: BlockRef, state: ChainState) -> int | None:
        """The block a parsed parameter names, if this node has it (1..tip)."""
        kind = ref[0]
        if kind == "tag":
            number: int | None = self.tip_number(ref[1], state)
        elif kind == "number":
            number = ref[1]
        elif kind == "hash":
            number = block_number_for_hash(ref[1], self.salt)
        elif kind == "archive":
            number = block_number_for_archive(ref[1], state.tip, self.salt)
        else:  # anchored {number, hash}: both must name the same block
            number = ref[1] if block_hash(ref[1], self.salt) == ref[2] else None
        return self.existing(number, state)

    def block_at(self, params: list[Any], state: ChainState) -> int | None:
        return self.resolve(parse_block_param(param(params, 0)), state)

    def get_block(self, params: list[Any], state: ChainState) -> bytes | None:
        number = self.block_at(params, state)
        opts = options_param(param(params, 1), _BLOCK_OPTIONS)
        if number is None:
            return None
        return block_response_json(self.chain, self.node.chain_key, number, *(opts[k] for k in _BLOCK_OPTIONS))

    def get_block_data(self, params: list[Any], state: ChainState) -> bytes | None:
        number = self.block_at(params, state)
        return None if number is None else block_data_json(self.chain, self.node.chain_key, number)

    def get_blocks(self, params: list[Any], state: ChainState) -> bytes:
        start = block_number(param(params, 0), minimum=1)
        if start is None:
            raise params_error("from must be a block number >= 1")
        count = limit_param(param(params, 1))
        flags = [options_param(param(params, 2), _BLOCK_OPTIONS)[k] for k in _BLOCK_OPTIONS]
        numbers = range(start, min(start + count - 1, state.tip) + 1)
        return b"[" + b",".join(block_response_json(self.chain, self.node.chain_key, n, *flags) for n in numbers) + b"]"

    # -- checkpoints

    def last_checkpoint(self, state: ChainState) -> int:
        return checkpoint_of(state.checkpointed)

    def get_checkpoint(self, params: list[Any], state: ChainState) -> bytes | None:
        kind, value = checkpoint_param(param(params, 0))
        flags = [options_param(param(params, 1), _CHECKPOINT_OPTIONS)[k] for k in _CHECKPOINT_OPTIONS]
        if kind == "tag":
            checkpoint = checkpoint_of(self.tip_number(value, state))
        elif kind == "slot":
            checkpoint = checkpoint_of(max(1, first_block_of_slot(self.chain, int(value))))
        else:
            checkpoint = int(value)
        if not 1 <= checkpoint <= self.last_checkpoint(state):
            return None
        return checkpoint_response_json(self.chain, self.node.chain_key, checkpoint, *flags)

    def get_checkpoints(self, params: list[Any], state: ChainState) -> bytes:
        start = checkpoint_number(param(params, 0), minimum=1)
        if start is None:
            raise params_error("from must be a checkpoint number >= 1")
        count = limit_param(param(params, 1))
        flags = [options_param(param(params, 2), _CHECKPOINT_OPTIONS)[k] for k in _CHECKPOINT_OPTIONS]
        end = min(start + count - 1, self.last_checkpoint(state))
        return b"[" + b",".join(
            checkpoint_response_json(self.chain, self.node.chain_key, c, *flags) for c in range(start, end + 1)) + b"]"

    def get_checkpoints_data(self, params: list[Any], state: ChainState) -> bytes:
        """``{from, limit}``, ``{fromSlot, limit, reverse?}`` or ``{epoch}`` (``CheckpointsQuerySchema``)."""
        query, last = param(params, 0), self.last_checkpoint(state)
        keys = set(query) if isinstance(query, dict) else set()
        if keys == {"epoch"} and checkpoint_number(query["epoch"]) is not None:
            spe = self.chain.slots_per_epoch
            epoch = checkpoint_number(query["epoch"])
            first = checkpoint_of(max(1, first_block_of_slot(self.chain, epoch * spe)))
            after = checkpoint_of(max(1, first_block_of_slot(self.chain, (epoch + 1) * spe)))
            numbers = list(range(first, min(after - 1, last) + 1))
        elif keys in ({"from", "limit"}, {"fromSlot", "limit"}, {"fromSlot", "limit", "reverse"}):
            count = limit_param(query["limit"])
            if "from" in keys:
                start = checkpoint_number(query["from"])
            else:
                slot = checkpoint_number(query["fromSlot"])
                start = None if slot is None else checkpoint_of(max(1, first_block_of_slot(self.chain, slot)))
            if start is None or not isinstance(query.get("reverse", False), bool):
                raise params_error("invalid checkpoints query")
            if query.get("reverse"):
                numbers = [c for c in range(min(start, last), start - count, -1) if c >= 1]
            else:
                numbers = list(range(max(start, 1), min(start + count - 1, last) + 1))
        else:
            raise params_error("expected {from, limit}, {fromSlot, limit, reverse?} or {epoch}")
        return b"[" + b",".join(checkpoint_data_json(self.chain, self.node.chain_key, c) for c in numbers) + b"]"

    # -- txs, state and logs

    def get_tx_receipt(self, params: list[Any], state: ChainState) -> bytes:
        value = tx_hash_param(params)
        opts = options_param(param(params, 1), ("includeTxEffect", "includePendingTx", "includeProof"))
        receipt = dumps(self.tx_receipt(value, state)).encode()
        where = tx_location(value, self.salt)
        if opts["includeTxEffect"] and where is not None and where[0] <= state.tip:
            receipt = receipt[:-1] + b',"txEffect":' + tx_effect_json(*where, self.salt).encode() + b"}"
        return receipt

    def get_public_storage_at(self, params: list[Any], state: ChainState) -> bytes:
        """World state at a block; the errors are the 5.x node's (upstream ``getWorldState``) and the
        5.x world state's once the block is pruned."""
        contract, slot = self.storage_args(params)
        ref = parse_block_param(param(params, 0))
        if ref == ("tag", "proposed"):  # the committed tree: never pruned
            return self.storage_value(contract, slot, state.tip)
        number = self.resolve(ref, state)
        if number is None:
            if ref[0] == "hash":
                raise RpcError(-32702, f"Block hash {ref[1]} not found when resolving query. If the node API "
                                       "has been queried with anchor block hash possibly a reorg has occurred.")
            if ref[0] == "archive":
                raise RpcError(-32702, f"Block with archive {ref[1]} not found when resolving query.")
            raise RpcError(-32702, f"Block not found for {inspect_block_param(ref)} when resolving query.")
        if number < state.oldest_historic:
            raise RpcError(-32702, pruned_error_5(number, state.oldest_historic))
        return self.storage_value(contract, slot, number)

    def get_public_logs_by_tags(self, params: list[Any], state: ChainState) -> bytes:
        """One inner array per tag; block ``n``'s first tx carries one public log tagged ``public_log_tag(n)``."""
        query = param(params, 0)
        if not isinstance(query, dict) or not isinstance(query.get("contractAddress"), str) \
                or not HEX_FIELD.fullmatch(query["contractAddress"]):
            raise params_error("expected {contractAddress, tags}")
        tags = query.get("tags")
        if not isinstance(tags, list) or not 1 <= len(tags) <= 100:
            raise params_error("tags must be an array of 1 to 100 tags")
        low = block_number(query.get("fromBlock", 1)) or 1
        high = block_number(query.get("toBlock", state.tip + 1))
        high = state.tip if high is None else min(high - 1, state.tip)  # toBlock is exclusive
        effects = query.get("includeEffects") is True
        out = []
        for tag in tags:
            value = tag.get("tag") if isinstance(tag, dict) else tag
            if not isinstance(value, str) or not HEX_FIELD.fullmatch(value):
                raise params_error("a tag must be a field element (0x + hex)")
            number = block_number_for_log_tag(value.lower(), self.salt)
            hit = number is not None and max(low, 1) <= number <= high
            out.append("[" + (log_result_json(self.chain, number, self.salt, effects) if hit else "") + "]")
        return ("[" + ",".join(out) + "]").encode()
