"""Pure: reading a ``getValidatorsStats`` answer into the grid the integrity rules judge.

Kept apart from the rules (:mod:`sentinel_proxy.core.integrity`) because this is where the wire
format of each Aztec version is known: status names change between versions (4.x
``checkpoint-proposed``, 5.x ``checkpoint-valid|invalid|unvalidated``) while the rules do not.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kinds of proposer entry, which decide how many attestation entries a slot should carry.
PRODUCED = "produced"        # checkpoint/block made and confirmed: committee − 1 attestation entries
UNCONFIRMED = "unconfirmed"  # proposal seen, not confirmed valid: only the attestations seen
MISSED = "missed"            # nothing produced: the proposer's entry alone

ATTESTATION_PREFIX = "attestation-"
_DECIMAL = re.compile(r"[0-9]+\Z")


class IntegrityInputError(ValueError):
    """The answer is not a validator-stats object; the caller marks the check failed."""


# --------------------------------------------------------------------------- statuses


def proposer_kind(status: str) -> str | None:
    """PRODUCED, UNCONFIRMED or MISSED for a proposer entry; None for an ``attestation-*`` entry.

    The status set is open (2.x ``block-*``, 4.x ``checkpoint-*``/``blocks-missed``, newer
    ``checkpoint-valid|invalid|unvalidated``, and whatever comes next): anything that is not an
    attestation is the proposer's entry. Only ``*-mined``, ``*-proposed`` and ``checkpoint-valid``
    promise a full committee record: the newer sentinel writes ``attestation-missed`` only when
    it has positive evidence the checkpoint was valid, so after ``checkpoint-invalid``,
    ``checkpoint-unvalidated`` or an unknown status only the attestations it saw are present.
    ``blocks-missed`` is a missed slot: no block proposal was seen at all (case 1 of the
    sentinel's taxonomy), so the slot has the proposer's entry alone.
    """
    if status.startswith(ATTESTATION_PREFIX):
        return None
    if status.endswith("-missed"):
        return MISSED
    if status.endswith(("-mined", "-proposed")) or status == "checkpoint-valid":
        return PRODUCED
    return UNCONFIRMED


# --------------------------------------------------------------------------- input


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _slot_number(value: Any) -> int | None:
    """A slot as an int (4.x sends JSON numbers, 2.x/3.x decimal strings), or None for anything else."""
    if type(value) is int:  # bool is not a slot
        return value if value >= 0 else None
    if isinstance(value, str) and _DECIMAL.match(value):
        return int(value)
    return None


def _bad_slot(where: str, value: Any) -> IntegrityInputError:
    return IntegrityInputError(f"{where}: expected a non-negative integer or decimal string, got {show(value)}")


def optional_slot(stats: Mapping[str, Any], key: str) -> int | None:
    value = stats.get(key)
    if value is None:
        return None
    slot = _slot_number(value)
    if slot is None:
        raise _bad_slot(key, value)
    return slot


@dataclass
class History:
    """Every entry of the answer, indexed the ways the rules read it (built in one pass)."""

    proposers: dict[int, list[str]] = field(default_factory=dict)         # slot -> proposer statuses
    attestations: dict[int, int] = field(default_factory=dict)            # slot -> attestation entries
    doubled_slots: set[int] = field(default_factory=set)                  # a validator has several entries
    epoch_counts: dict[int, dict[str, int]] = field(default_factory=dict)  # epoch -> status -> entries
    epoch_validators: dict[int, set[Any]] = field(default_factory=dict)   # epoch -> addresses seen

    @property
    def slots(self) -> set[int]:
        return self.proposers.keys() | self.attestations.keys()


def _where(address: Any, index: int) -> str:
    return f"stats[{show(address)}].history[{index}]"


def collect(validators: Mapping[Any, Any], slots_per_epoch: int) -> History:
    """One pass over ~37k entries on a 4.x node: keep the inner loop to plain dict operations."""
    history = History()
    proposers, attestations, doubled = history.proposers, history.attestations, history.doubled_slots
    epoch_counts, epoch_validators = history.epoch_counts, history.epoch_validators
    for address, record in validators.items():
        if not isinstance(record, Mapping):
            raise IntegrityInputError(f"stats[{show(address)}] is not an object")
        entries = record.get("history")
        if not isinstance(entries, (list, tuple)):
            raise IntegrityInputError(f"stats[{show(address)}].history is not a list")
        seen: set[int] = set()
        for index, entry in enumerate(entries):
            if type(entry) is not dict and not isinstance(entry, Mapping):  # the ABC check is slow
                raise IntegrityInputError(f"{_where(address, index)} is not an object")
            raw_slot, status = entry.get("slot"), entry.get("status")
            slot = raw_slot if type(raw_slot) is int and raw_slot >= 0 else _slot_number(raw_slot)
            if slot is None:
                raise _bad_slot(f"{_where(address, index)}.slot", raw_slot)
            if type(status) is not str:
                raise IntegrityInputError(f"{_where(address, index)}.status: expected a string, got {show(status)}")
            if slot in seen:
                doubled.add(slot)
            seen.add(slot)
            if status.startswith(ATTESTATION_PREFIX):
                attestations[slot] = attestations.get(slot, 0) + 1
            else:
                proposers.setdefault(slot, []).append(status)
            epoch = slot // slots_per_epoch
            counts = epoch_counts.get(epoch)
            if counts is None:
                counts = epoch_counts[epoch] = {}
                epoch_validators[epoch] = set()
            counts[status] = counts.get(status, 0) + 1
            epoch_validators[epoch].add(address)
    return history
