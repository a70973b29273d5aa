"""The 4.x method handlers of a simulated node (``node_*``, ``p2p_getPeers``; 2.x/3.x shapes for ``legacy``).

Each handler takes ``(params, state)`` and returns the result's JSON bytes, None for "not found", or
raises ``RpcError``.  ``NodeMethods5`` (``methods5.py``) reuses what did not change in 5.x.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sentinel_simnode.blocks import block_header_json, block_json, tx_effect_json
from sentinel_simnode.chain import (
    HEX_FIELD,
    ChainParams,
    ChainState,
    Scenario,
    block_hash,
    block_number_for_hash,
    block_slot,
    checkpoint_of,
    dumps,
    hash32,
    tx_location,
)
from sentinel_simnode.rpc import Handler, RpcError, is_int, param, params_error, tx_hash_param
from sentinel_simnode.sentinel import validators_stats_json

if TYPE_CHECKING:
    from sentinel_simnode.resource import SimulatedNode

PEERS = dumps([
    {"status": "connected", "score": 10 - i, "id": "16Uiu2HAm" + hash32("peer", i)[2:46]} for i in range(3)
]).encode()

#: Methods a 2.x/3.x node does not have.
V4_ONLY = frozenset({"getCheckpointedBlockNumber"})


def hash_string(value: str) -> str:
    """How the node prints a block hash it parsed (``Fr.toString``): 0x + 64 lowercase hex.

    A decimal string is a field element in decimal (``"5"`` is 0x…05), as ``Fr.fromString`` reads it.
    """
    if value.isdigit():
        return f"0x{int(value):064x}"
    if HEX_FIELD.fullmatch(value):
        return f"0x{int(value[2:], 16):064x}"
    return value


class NodeMethods:
    """The 4.x handlers of one ``SimulatedNode`` (read through it: scenario and chain may change)."""

    def __init__(self, node: SimulatedNode) -> None:
        self.node = node

    @property
    def chain(self) -> ChainParams:
        return self.node.chain

    @property
    def scenario(self) -> Scenario:
        return self.node.scenario

    @property
    def salt(self) -> str:
        return self.node.salt

    def table(self) -> dict[str, Handler]:
        """Full method name -> handler, for the node's current scenario."""
        methods: dict[str, Handler] = {
            "isReady": self.is_ready,
            "getBlockNumber": lambda p, s: str(s.tip).encode(),
            "getProvenBlockNumber": lambda p, s: str(s.proven).encode(),
            "getCheckpointedBlockNumber": lambda p, s: str(s.checkpointed).encode(),
            "getL2Tips": self.get_tips,
            "getWorldStateSyncStatus": lambda p, s: self.node.per_tip("sync", s, self.build_sync_status),
            "getCurrentMinFees": lambda p, s: self.node.per_tip("fees", s, self.build_min_fees),
            "getNodeInfo": lambda p, s: self.node.node_info,
            "getBlock": self.get_block,
            "getBlockByHash": self.get_block_by_hash,
            "getBlockHeader": self.get_block_header,
            "getBlocks": self.get_blocks,
            "getTxReceipt": self.get_tx_receipt,
            "getTxEffect": self.get_tx_effect,
            "getPublicStorageAt": self.get_public_storage_at,
            "getValidatorsStats": self.get_validators_stats,
        }
        legacy = self.scenario.legacy
        table = {f"node_{name}": h for name, h in methods.items() if not (legacy and name in V4_ONLY)}
        table["p2p_getPeers"] = lambda p, s: PEERS
        return table

    # -- answers that only change with the tip

    def ref(self, number: int) -> dict[str, Any]:
        return {"number": number, "hash": block_hash(number, self.salt)}

    def checkpoint_ref(self, number: int) -> dict[str, Any]:
        c = checkpoint_of(number)
        return {"block": self.ref(number), "checkpoint": {"number": c, "hash": hash32("checkpoint", c, self.salt)}}

    def build_tips(self, state: ChainState) -> bytes:
        if self.scenario.legacy:
            tips = {"latest": self.ref(state.tip), "proven": self.ref(state.proven),
                    "finalized": self.ref(state.finalized)}
        else:
            tips = {"proposed": self.ref(state.tip), "checkpointed": self.checkpoint_ref(state.checkpointed),
                    "proven": self.checkpoint_ref(state.proven), "finalized": self.checkpoint_ref(state.finalized)}
        return dumps(tips).encode()

    def build_sync_status(self, state: ChainState) -> bytes:
        return dumps({
            "finalizedBlockNumber": state.finalized,
            "latestBlockNumber": state.tip,
            "latestBlockHash": block_hash(state.tip, self.salt),
            "oldestHistoricBlockNumber": state.oldest_historic,
            "treesAreSynched": True,
        }).encode()

    def build_min_fees(self, state: ChainState) -> bytes:
        return dumps({"feePerDaGas": "0", "feePerL2Gas": str(12_000_000 + (state.tip % 10) * 10_000)}).encode()

    # -- handlers

    def is_ready(self, params: list[Any], state: ChainState) -> bytes:
        return b"true" if self.scenario.ready else b"false"

    def get_tips(self, params: list[Any], state: ChainState) -> bytes:
        return self.node.per_tip("tips", state, self.build_tips)

    def block_param(self, value: Any, state: ChainState) -> int | None:
        """Block number | block hash | "latest"; any other string is a hash we do not know."""
        if is_int(value):
            if value < 0:
                raise params_error("block number must be >= 0")
            return value
        if isinstance(value, str):
            return state.tip if value == "latest" else block_number_for_hash(value, self.salt)
        raise params_error("expected a block number, a block hash or 'latest'")

    @staticmethod
    def existing(number: int | None, state: ChainState) -> int | None:
        return number if number is not None and 1 <= number <= state.tip else None

    def get_block(self, params: list[Any], state: ChainState) -> bytes | None:
        number = self.existing(self.block_param(param(params, 0), state), state)
        return None if number is None else block_json(self.chain, self.node.chain_key, number)

    def get_block_by_hash(self, params: list[Any], state: ChainState) -> bytes | None:
        value = param(params, 0)
        if not isinstance(value, str):
            raise params_error("expected a block hash")
        number = self.existing(block_number_for_hash(value, self.salt), state)
        return None if number is None else block_json(self.chain, self.node.chain_key, number)

    def get_block_header(self, params: list[Any], state: ChainState) -> bytes | None:
        value = param(params, 0)
        number = self.existing(state.tip if value is None else self.block_param(value, state), state)
        return None if number is None else block_header_json(self.chain, self.node.chain_key, number).encode()

    def get_blocks(self, params: list[Any], state: ChainState) -> bytes:
        start, limit = param(params, 0), param(params, 1)
        if not is_int(start) or start < 1:
            raise params_error("from must be an integer >= 1")
        if not is_int(limit) or not 1 <= limit <= 50:
            raise params_error("limit must be an integer between 1 and 50")
        end = min(start + limit - 1, state.tip)
        return b"[" + b",".join(block_json(self.chain, self.node.chain_key, n) for n in range(start, end + 1)) + b"]"

    @staticmethod
    def receipt_status(number: int, state: ChainState) -> str:
        if number <= state.finalized:
            return "finalized"
        if number <= state.proven:
            return "proven"
        if number <= state.checkpointed:
            return "checkpointed"
        return "proposed"

    def tx_receipt(self, value: str, state: ChainState) -> dict[str, Any]:
        where = tx_location(value, self.salt)
        legacy = self.scenario.legacy
        if where is None or where[0] > state.tip:
            return {"txHash": value, "status": "dropped", **({"error": ""} if legacy else {})}
        number, fee = where[0], "1250000000"
        if legacy:  # 2.x/3.x receipts: "success" and an error string, no finality
            return {"txHash": value, "status": "success", "error": "", "transactionFee": fee,
                    "blockHash": block_hash(number, self.salt), "blockNumber": number}
        return {"txHash": value, "status": self.receipt_status(number, state), "executionResult": "success",
                "blockHash": block_hash(number, self.salt), "blockNumber": number,
                "epochNumber": block_slot(self.chain, number) // self.chain.slots_per_epoch,
                "transactionFee": fee}

    def get_tx_receipt(self, params: list[Any], state: ChainState) -> bytes:
        return dumps(self.tx_receipt(tx_hash_param(params), state)).encode()

    def get_tx_effect(self, params: list[Any], state: ChainState) -> bytes | None:
        where = tx_location(tx_hash_param(params), self.salt)
        if where is None or where[0] > state.tip:
            return None
        number, index = where
        return (
            f'{{"l2BlockNumber":{number},"l2BlockHash":"{block_hash(number, self.salt)}",'
            f'"txIndexInBlock":{index},"data":{tx_effect_json(number, index, self.salt)}}}'
        ).encode()

    def storage_args(self, params: list[Any]) -> tuple[str, int]:
        contract, slot = param(params, 1), param(params, 2)
        if not isinstance(contract, str) or not HEX_FIELD.fullmatch(contract):
            raise params_error("expected a contract address")
        if not isinstance(slot, str) or not HEX_FIELD.fullmatch(slot):
            raise params_error("expected a storage slot")
        return contract.lower(), int(slot, 16)

    def storage_value(self, contract: str, slot: int, number: int) -> bytes:
        return dumps(hash32("storage", f"{contract}:{slot}:{number}", self.salt)).encode()

    def get_public_storage_at(self, params: list[Any], state: ChainState) -> bytes:
        """World state at a block; the errors are the 4.1.2 node's (``aztec-node/server.ts``
        ``#getWorldState``, and the native world state's ``find_low_leaf`` once a block is pruned)."""
        contract, slot = self.storage_args(params)
        block = param(params, 0)
        number = self.block_param(block, state)
        if number is None:
            raise RpcError(-32702, f"Block hash {hash_string(block)} not found when querying world state. If the "
                                   "node API has been queried with anchor block hash possibly a reorg has occurred.")
        if number > state.tip:
            raise RpcError(-32702, f"Queried block {number} not yet synced by the node "
                                   f"(node is synced upto {state.tip}).")
        if number < state.oldest_historic:
            raise RpcError(-32702, pruned_error_4(number))
        return self.storage_value(contract, slot, number)

    def get_validators_stats(self, params: list[Any], state: ChainState) -> bytes:
        return validators_stats_json(self.chain, self.scenario, state.last_processed_slot, self.node.dialect)


def pruned_error_4(number: int) -> str:
    """A 4.x node asked for state below its oldest historic block (barretenberg world state,
    ``ContentAddressedIndexedTree::find_low_leaf``, as shipped in ``@aztec/bb.js`` 4.1.2)."""
    return f"Unable to find low leaf for block {number}, failed to get block data."
