"""The simulated chain: network parameters, scenarios, and the block, tx and validator model.

Everything here is a pure function of ``(ChainParams, Scenario, elapsed seconds)``: no clock, no I/O, so
unit tests drive it with numbers and several simulated nodes in one process agree on every block hash
and committee.  Block, tx and log-tag hashes carry the number they stand for, so a lookup by hash needs
no index (archive roots, older than that rule, are indexed on first use).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache

GENESIS_TIME = 1_760_000_000  # L1 timestamp of slot 0 (same as gobench)

# Finality lags behind the proposed tip, as in gobench.
CHECKPOINTED_LAG = 2
PROVEN_LAG = 10
FINALIZED_LAG = 20
BLOCKS_PER_CHECKPOINT = 4  # checkpoint c holds blocks 4c-3 .. 4c (gobench)

FAILURES = (None, "500", "reset", "garbage", "hang")

# Proposer outcomes and how often they happen; the rest of the slots are mined.
_MISSED_RATE = 0.05
_PROPOSED_RATE = 0.02  # proposed (attested) but not mined
_ATTESTATION_MISSED_RATE = 0.02

HEX64 = re.compile(r"0x[0-9a-fA-F]{64}")
HEX_FIELD = re.compile(r"0x[0-9a-fA-F]{1,64}")

#: Compact JSON, as the real server writes it.
dumps = json.JSONEncoder(separators=(",", ":")).encode

#: The wire dialects a simulated node speaks: Aztec 4.x (``node_*``) and 5.x (``aztec_*``, see
#: ``docs/aztec-protocol.md``).
DIALECTS = ("4", "5")

# ---------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ChainParams:
    """Network parameters of the simulated chain (4.x mainnet defaults).

    ``start_slot`` defaults to ``slots_per_epoch * 400 + slots_per_epoch // 2``: far enough from slot 0
    for a 128-epoch archiver history plus a lag, and in the middle of an epoch so that, as on a real
    node, the oldest and the current epoch of the sentinel window are partial.
    """

    slots_per_epoch: int = 32
    committee_size: int = 48
    slot_seconds: float = 72.0
    block_seconds: float = 2.0  # the proposed tip advances by one block this often
    start_block: int = 1000  # node_getBlockNumber at elapsed 0
    start_slot: int | None = None

    def __post_init__(self) -> None:
        if self.slots_per_epoch < 1 or self.committee_size < 1:
            raise ValueError("slots_per_epoch and committee_size must be >= 1")
        if self.slot_seconds <= 0 or self.block_seconds <= 0:
            raise ValueError("slot_seconds and block_seconds must be > 0")
        if self.start_block < 1:
            raise ValueError("start_block must be >= 1")
        if self.start_slot is None:
            object.__setattr__(self, "start_slot", self.slots_per_epoch * 400 + self.slots_per_epoch // 2)
        elif self.start_slot < 0:
            raise ValueError("start_slot must be >= 0")

    @property
    def validator_pool_size(self) -> int:
        """Twice the committee, so the set of addresses in the stats changes from epoch to epoch."""
        return 2 * self.committee_size


@dataclass(frozen=True)
class Scenario:
    """How one simulated node behaves.  Frozen so it can key the caches; swap it whole at runtime."""

    name: str
    ready: bool = True
    lag_blocks: int = 0  # the tip trails a healthy node by this many blocks
    lag_epochs: int = 0  # the slot clock (sentinel) trails by this many epochs
    history_epochs: int = 24  # sentinel window, in epochs
    # Sentinel holes, counted back from the epoch of lastProcessedSlot so that they stay in the middle
    # of the window however long the node runs: whole epochs, and (epochs back, slot index) pairs.
    dropped_epochs: tuple[int, ...] = ()
    dropped_slots: tuple[tuple[int, int], ...] = ()
    legacy: bool = False  # Aztec 2.x/3.x shapes
    delay_seconds: float = 0.0  # added to every answer (clock.callLater)
    failure: str | None = None  # one of FAILURES
    rollup_version: int = 1
    l1_chain_id: int = 31337
    sentinel_enabled: bool = True
    # World-state history kept below the tip, in blocks; None keeps all of it (oldest block 1).
    oldest_historic: int | None = 64

    def __post_init__(self) -> None:
        if self.failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, not {self.failure!r}")
        if self.history_epochs < 1:
            raise ValueError("history_epochs must be >= 1")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("archiver", history_epochs=128, oldest_historic=None),
        Scenario("pruned"),
        Scenario("missing-epochs", dropped_epochs=(8, 9), dropped_slots=((4, 3), (4, 11), (4, 20))),
        Scenario("lagging", lag_blocks=50, lag_epochs=2),
        Scenario("not-ready", ready=False),
        Scenario("legacy", legacy=True),
        Scenario("slow", delay_seconds=0.2),
        Scenario("failing-500", failure="500"),
        Scenario("failing-reset", failure="reset"),
        Scenario("failing-garbage", failure="garbage"),
        Scenario("hang", failure="hang"),
        Scenario("other-rollup", rollup_version=2),
        Scenario("sentinel-disabled", sentinel_enabled=False),
    )
}


def get_scenario(scenario: Scenario | str) -> Scenario:
    """Accept a ``Scenario`` or its name (CLI, tests); unknown names raise ``ValueError``."""
    if isinstance(scenario, Scenario):
        return scenario
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise ValueError(f"unknown scenario {scenario!r} (choose from: {', '.join(SCENARIOS)})") from None


# ---------------------------------------------------------------------------------- chain model


@dataclass(frozen=True)
class ChainState:
    """What one node reports at one instant; computed once per HTTP request (one tip per batch)."""

    tip: int
    checkpointed: int
    proven: int
    finalized: int
    oldest_historic: int
    slot: int
    last_processed_slot: int


def chain_state(params: ChainParams, scenario: Scenario, elapsed: float) -> ChainState:
    """The node's view after ``elapsed`` seconds: tip +1 per block, slot +1 per slot, finality lags."""
    tip = max(0, params.start_block - scenario.lag_blocks + int(elapsed // params.block_seconds))
    first_slot = params.start_slot - scenario.lag_epochs * params.slots_per_epoch
    slot = max(0, first_slot + int(elapsed // params.slot_seconds))
    if scenario.oldest_historic is None:
        oldest = 1
    else:
        oldest = max(1, tip - scenario.oldest_historic)
    return ChainState(
        tip=tip,
        checkpointed=max(0, tip - CHECKPOINTED_LAG),
        proven=max(0, tip - PROVEN_LAG),
        finalized=max(0, tip - FINALIZED_LAG),
        oldest_historic=oldest,
        slot=slot,
        last_processed_slot=slot - 1,
    )


def chain_salt(chain: tuple[int, int]) -> str:
    """Hash prefix for ``(l1 chain id, rollup version)``: another rollup is another chain, so its
    hashes differ; empty for the default chain so that hashes match gobench's."""
    return "" if chain == (31337, 1) else f"{chain[0]}/{chain[1]}/"


def hash32(kind: str, n: int | str, salt: str = "") -> str:
    """A deterministic 0x+64-hex field; equals gobench's ``hash32`` for the default chain."""
    return "0x" + hashlib.sha256(f"{salt}{kind}:{n}".encode()).hexdigest()


def block_hash(number: int, salt: str = "") -> str:
    """Block hash with the number in its last 12 hex digits, so a lookup by hash needs no index."""
    return hash32("block", number, salt)[:54] + f"{number:012x}"


def block_number_for_hash(value: str, salt: str = "") -> int | None:
    """Invert ``block_hash``; any string that is not one of ours (``"5"`` included) gives None."""
    if not HEX64.fullmatch(value):
        return None
    number = int(value[54:], 16)
    return number if block_hash(number, salt) == value.lower() else None


def archive_root(number: int, salt: str = "") -> str:
    """Root of the archive tree after block ``number`` (block ``number + 1`` has it as ``lastArchive``)."""
    return hash32("archive", number, salt)


# Archive roots are the one hash that does not carry its number (its bytes predate ``{archive}``
# lookups), so they are indexed: per salt, every root up to the highest tip asked about so far.
_ARCHIVE_INDEX: dict[str, tuple[dict[str, int], list[int]]] = {}


def block_number_for_archive(value: str, tip: int, salt: str = "") -> int | None:
    """The block (1..tip) whose archive root is ``value``; None for a root this chain never made."""
    roots, done = _ARCHIVE_INDEX.setdefault(salt, ({}, [0]))
    for number in range(done[0] + 1, tip + 1):
        roots[archive_root(number, salt)] = number
    done[0] = max(done[0], tip)
    number = roots.get(value.lower())
    return number if number is not None and number <= tip else None


def public_log_tag(number: int, salt: str = "") -> str:
    """The tag of the one public log of block ``number`` (first tx), with the number in its last 12 hex."""
    return hash32("log-tag", number, salt)[:54] + f"{number:012x}"


def block_number_for_log_tag(value: str, salt: str = "") -> int | None:
    """Invert ``public_log_tag``; None for any other string."""
    if not HEX64.fullmatch(value):
        return None
    number = int(value[54:], 16)
    return number if public_log_tag(number, salt) == value.lower() else None


def tx_count(number: int) -> int:
    """Each block holds one to three transactions."""
    return 1 + number % 3


def tx_hash(number: int, index: int, salt: str = "") -> str:
    """Tx hash carrying its block number and index, so receipts need no index either."""
    return hash32("tx", f"{number}:{index}", salt)[:50] + f"{number:012x}{index:04x}"


def tx_location(value: str, salt: str = "") -> tuple[int, int] | None:
    """Invert ``tx_hash`` to ``(block number, index)``; None for a hash this chain never made."""
    if not HEX64.fullmatch(value):
        return None
    number, index = int(value[50:62], 16), int(value[62:], 16)
    if number < 1 or index >= tx_count(number) or tx_hash(number, index, salt) != value.lower():
        return None
    return number, index


def checkpoint_of(number: int) -> int:
    """Checkpoint number holding a block."""
    return (number + BLOCKS_PER_CHECKPOINT - 1) // BLOCKS_PER_CHECKPOINT


def checkpoint_blocks(checkpoint: int) -> tuple[int, int]:
    """First and last block of a checkpoint."""
    return BLOCKS_PER_CHECKPOINT * checkpoint - BLOCKS_PER_CHECKPOINT + 1, BLOCKS_PER_CHECKPOINT * checkpoint


def first_block_of_slot(params: ChainParams, slot: int) -> int:
    """The first block built in ``slot`` (inverse of ``block_slot``; may be 0 or below for old slots)."""
    seconds = (slot - params.start_slot) * params.slot_seconds
    return params.start_block + int(-(-seconds // params.block_seconds))


def block_slot(params: ChainParams, number: int) -> int:
    """The slot a block was built in, from the same clock as the tip (fixed per block, any lag)."""
    offset = int(((number - params.start_block) * params.block_seconds) // params.slot_seconds)
    return max(0, params.start_slot + offset)


@lru_cache(maxsize=1024)
def validator_address(index: int) -> str:
    """Validator ``index`` of the pool: 0x+40 lowercase hex (gobench's ``ethAddr``)."""
    return "0x" + hashlib.sha256(f"validator:{index}".encode()).hexdigest()[:40]


@lru_cache(maxsize=1024)
def committee(params: ChainParams, epoch: int) -> tuple[int, ...]:
    """Pool indices of the epoch's committee (``committee_size`` distinct validators)."""
    rng = random.Random(f"committee:{epoch}")
    return tuple(rng.sample(range(params.validator_pool_size), params.committee_size))


@dataclass(frozen=True)
class SlotOutcome:
    """What happened in one slot: the proposer's result and which attesters missed."""

    proposer: int  # pool index
    proposal: str  # "mined" | "proposed" | "missed"
    attesters: tuple[int, ...]  # the committee minus the proposer
    missed_attesters: frozenset[int]


@lru_cache(maxsize=16384)
def slot_outcome(params: ChainParams, slot: int) -> SlotOutcome:
    """Deterministic per slot; cached because the sentinel window re-reads every slot once a slot."""
    members = committee(params, slot // params.slots_per_epoch)
    rng = random.Random(f"slot:{slot}")
    proposer = members[rng.randrange(len(members))]
    draw = rng.random()
    if draw < _MISSED_RATE:
        proposal = "missed"
    elif draw < _MISSED_RATE + _PROPOSED_RATE:
        proposal = "proposed"
    else:
        proposal = "mined"
    attesters = tuple(m for m in members if m != proposer)
    if proposal == "missed":
        missed: frozenset[int] = frozenset()
    else:
        missed = frozenset(m for m in attesters if rng.random() < _ATTESTATION_MISSED_RATE)
    return SlotOutcome(proposer, proposal, attesters, missed)


def initial_slot(params: ChainParams, scenario: Scenario) -> int:
    """Slot at which the node's sentinel started: just before the window it shows at elapsed 0.

    It stays fixed while the window slides on, as on a long-running real node.
    """
    window = scenario.history_epochs * params.slots_per_epoch
    return params.start_slot - scenario.lag_epochs * params.slots_per_epoch - 1 - window


def dropped_slots(params: ChainParams, scenario: Scenario, last_processed_slot: int) -> frozenset[int]:
    """Slots the scenario leaves out of the sentinel history (relative to the current epoch)."""
    spe = params.slots_per_epoch
    current = last_processed_slot // spe
    slots = {(current - back) * spe + i for back in scenario.dropped_epochs for i in range(spe)}
    slots.update((current - back) * spe + index % spe for back, index in scenario.dropped_slots)
    return frozenset(slots)

