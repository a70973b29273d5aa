"""Tests of sentinel_proxy.core.integrity on hand-made and synthetic validator-stats histories.

``SyntheticNode`` builds the answer a healthy node's sentinel gives (protocol-faithful: one proposer
entry per processed slot, committee − 1 attestation entries when the checkpoint was produced);
tests then damage its entries and check what the analyser reports.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_proxy.core.integrity import (
    MISSED,
    PRODUCED,
    UNCONFIRMED,
    EpochFinding,
    IntegrityInputError,
    IntegrityParams,
    IntegrityVerdict,
    analyse,
    proposer_kind,
)

Entry = tuple[str, int, str]  # (validator address, slot, status)

#: Proposer statuses per generation of the sentinel: (produced, missed, unconfirmed).
FLAVOURS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "2x": (("block-mined", "block-proposed"), ("block-missed",), ()),
    "4x": (("checkpoint-mined", "checkpoint-proposed"), ("checkpoint-missed", "blocks-missed"), ()),
    "dev": (("checkpoint-mined", "checkpoint-valid"), ("checkpoint-missed", "blocks-missed"),
            ("checkpoint-invalid", "checkpoint-unvalidated")),
}


def address(n: int) -> str:
    return f"0x{n:040x}"


def committee_of(epoch: int, size: int) -> list[str]:
    """A committee rotating through a pool twice its size, so ``stats`` holds more addresses than one committee."""
    return [address((epoch * 3 + i) % (2 * size)) for i in range(size)]


@dataclass(frozen=True)
class SyntheticNode:
    """A node whose sentinel recorded slots ``first_slot..last_slot``, all complete.

    ``full_epochs`` complete epochs from ``first_epoch``, preceded by ``lead_in`` slots of a partial
    epoch and followed by ``tail`` slots of the current epoch (``tail >= 1``).
    """

    spe: int = 32
    committee: int = 24
    first_epoch: int = 10
    full_epochs: int = 3
    lead_in: int = 0
    tail: int = 4
    flavour: str = "4x"
    missed: frozenset[int] = frozenset()        # slots where nothing was produced
    unconfirmed: frozenset[int] = frozenset()   # slots with checkpoint-invalid/unvalidated (dev flavour)
    string_slots: bool = False
    slot_window: int | None = None               # default: 24 epochs

    @property
    def first_slot(self) -> int:
        return self.first_epoch * self.spe - self.lead_in

    @property
    def last_slot(self) -> int:
        return (self.first_epoch + self.full_epochs) * self.spe + self.tail - 1

    @property
    def current_epoch(self) -> int:
        return self.first_epoch + self.full_epochs

    @property
    def full_epoch_numbers(self) -> list[int]:
        return list(range(self.first_epoch, self.current_epoch))

    def epoch_slots(self, epoch: int) -> range:
        return range(epoch * self.spe, (epoch + 1) * self.spe)

    def params(self, **overrides: Any) -> IntegrityParams:
        return IntegrityParams(slots_per_epoch=self.spe, expected_validators=self.committee, **overrides)

    def slot_entries(self, slot: int) -> list[Entry]:
        members = committee_of(slot // self.spe, self.committee)
        proposer = members[slot % self.committee]
        others = [m for m in members if m != proposer]
        produced, missed, unconfirmed = FLAVOURS[self.flavour]
        if slot in self.missed:
            return [(proposer, slot, missed[slot % len(missed)])]
        if slot in self.unconfirmed and unconfirmed:
            # Only the attestations the sentinel saw; never attestation-missed.
            seen = others[: len(others) // 2]
            return [(proposer, slot, unconfirmed[slot % len(unconfirmed)])] + [(m, slot, "attestation-sent") for m in seen]
        entries = [(proposer, slot, produced[slot % len(produced)])]
        for i, member in enumerate(others):
            entries.append((member, slot, "attestation-missed" if (slot + i) % 7 == 0 else "attestation-sent"))
        return entries

    def entries(self) -> list[Entry]:
        return [e for slot in range(self.first_slot, self.last_slot + 1) for e in self.slot_entries(slot)]

    def answer(self, entries: Iterable[Entry] | None = None, **top: Any) -> dict[str, Any]:
        """The node_getValidatorsStats result; ``top`` overrides top-level fields (None removes one)."""
        stats: dict[str, Any] = {}
        for who, slot, status in self.entries() if entries is None else entries:
            record = stats.setdefault(who, {
                "address": who, "totalSlots": 0,
                "missedProposals": {"currentStreak": 0, "count": 0, "total": 0},
                "missedAttestations": {"currentStreak": 0, "count": 0, "total": 0},
                "history": [],
            })
            record["history"].append({"slot": self.slot_value(slot), "status": status})
            record["totalSlots"] += 1
        result: dict[str, Any] = {
            "stats": stats,
            "lastProcessedSlot": self.slot_value(self.last_slot),
            "initialSlot": self.slot_value(self.first_slot - 1),
            "slotWindow": 24 * self.spe if self.slot_window is None else self.slot_window,
        }
        for key, value in top.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = value
        return result

    def slot_value(self, slot: int) -> int | str:
        return str(slot) if self.string_slots else slot

    def analyse(self, entries: Iterable[Entry] | None = None, params: IntegrityParams | None = None,
                **top: Any) -> IntegrityVerdict:
        return analyse(self.answer(entries, **top), params or self.params())


def without_slots(entries: Iterable[Entry], slots: Iterable[int]) -> list[Entry]:
    gone = set(slots)
    return [e for e in entries if e[1] not in gone]


def epoch_finding(verdict: IntegrityVerdict, epoch: int) -> EpochFinding:
    return next(e for e in verdict.epochs if e.epoch == epoch)


def assert_perfect(verdict: IntegrityVerdict, node: SyntheticNode) -> None:
    assert verdict.status == "perfect", verdict.findings
    assert verdict.score == 100
    assert [e.epoch for e in verdict.epochs] == node.full_epoch_numbers
    assert all(e.verdict == "VALID" and not e.rules for e in verdict.epochs)
    assert verdict.missing_epochs == () and verdict.inconsistent_epochs == ()


BASE = SyntheticNode()
DAMAGED = 11  # the epoch the rule tests damage (slots 352..383 with the base node)


# --------------------------------------------------------------------------- complete histories


@pytest.mark.parametrize("flavour,string_slots", [("2x", True), ("4x", False), ("dev", False)])
def test_complete_history_of_each_status_set_is_perfect(flavour: str, string_slots: bool) -> None:
    epoch = BASE.first_epoch
    node = replace(BASE, flavour=flavour, string_slots=string_slots,
                   missed=frozenset({epoch * 32 + 1, epoch * 32 + 2, (epoch + 1) * 32 + 5}),
                   unconfirmed=frozenset({epoch * 32 + 3, (epoch + 2) * 32 + 6}))
    verdict = node.analyse()
    assert_perfect(verdict, node)
    assert verdict.node_type == "pruned"
    assert verdict.current_epoch == node.current_epoch
    assert verdict.last_processed_slot == node.last_slot
    assert verdict.oldest_slot == node.first_slot
    produced, missed, unconfirmed = FLAVOURS[flavour]
    statuses = set().union(*(e.counts for e in verdict.epochs))
    assert set(produced) | set(missed) | set(unconfirmed) <= statuses


def test_unknown_proposer_status_is_the_slots_proposer_entry() -> None:
    slot = DAMAGED * 32 + 3
    entries = [(who, s, "checkpoint-frobnicated" if s == slot and status.startswith("checkpoint") else status)
               for who, s, status in BASE.entries()]
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.score == 100 and finding.counts["checkpoint-frobnicated"] == 1
    assert finding.proposer_entries == 32


@pytest.mark.parametrize("status,kind", [
    ("block-mined", PRODUCED), ("block-proposed", PRODUCED), ("checkpoint-mined", PRODUCED),
    ("checkpoint-proposed", PRODUCED), ("checkpoint-valid", PRODUCED),
    ("checkpoint-invalid", UNCONFIRMED), ("checkpoint-unvalidated", UNCONFIRMED), ("checkpoint-new", UNCONFIRMED),
    ("block-missed", MISSED), ("checkpoint-missed", MISSED), ("blocks-missed", MISSED),
    ("attestation-sent", None), ("attestation-missed", None), ("attestation-whatever", None),
])
def test_proposer_kind(status: str, kind: str | None) -> None:
    assert proposer_kind(status) == kind


# --------------------------------------------------------------------------- the prototype's four rules


def test_rule_more_validators_than_expected_costs_40() -> None:
    slot = DAMAGED * 32
    entries = BASE.entries()
    index = next(i for i, e in enumerate(entries) if e[1] == slot and e[2].startswith("attestation"))
    entries[index] = (address(10_000), slot, entries[index][2])  # an outsider in place of a member
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.validators == 25
    assert finding.score == 60 and finding.verdict == "PARTIAL"
    assert finding.rules == ("25 distinct validators > 24 expected (-40)",)
    assert finding.missing_slots == () and finding.inconsistent_slots == ()


@pytest.mark.parametrize("missed", [True, False], ids=["missed-slots", "produced-slots"])
def test_rule_proposer_entries_costs_30_per_epoch_of_slots(missed: bool) -> None:
    dropped = range(DAMAGED * 32 + 4, DAMAGED * 32 + 8)
    node = replace(BASE, missed=frozenset(dropped) if missed else frozenset())
    verdict = node.analyse(without_slots(node.entries(), dropped))
    finding = epoch_finding(verdict, DAMAGED)
    assert finding.proposer_entries == 28
    assert finding.score == 96 and finding.verdict == "WARNING"  # 100 - 30 * 4 / 32 = 96.25
    assert finding.rules[0] == "proposer entries 28 != 32 slots (-3.75)"
    assert finding.missing_slots == tuple(dropped)
    assert finding.inconsistent_slots == ()
    assert verdict.inconsistent_epochs == (DAMAGED,)


def test_rule_attestation_entries_costs_25_per_epoch_of_committee_slots() -> None:
    damaged_slots = list(BASE.epoch_slots(DAMAGED))[:24]
    entries, removed = [], {s: 0 for s in damaged_slots}
    for who, slot, status in BASE.entries():
        if slot in removed and status.startswith("attestation") and removed[slot] < 2:
            removed[slot] += 1
            continue
        entries.append((who, slot, status))
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.attestation_entries == 32 * 23 - 48
    assert finding.validators == 24
    assert finding.score == 98  # 100 - 25 * 48 / (32 * 24) = 98.4375
    assert finding.rules[0] == "attestation entries off by 48 from what the proposer statuses promise (-1.562)"
    assert finding.inconsistent_slots == tuple(damaged_slots)
    assert "slot 352: checkpoint-mined with 21 attestation entries, expected 23" in finding.rules


def small_committee_entries(node: SyntheticNode, actual: int, missed_slot: int | None = None) -> list[Entry]:
    """Committees of ``actual`` < expected members whose slots still carry expected − 1 attestation
    entries (two members' entries doubled): only the validator-count rule can see the shortfall."""
    small = replace(node, committee=actual, missed=frozenset({missed_slot} if missed_slot is not None else ()))
    entries = []
    for slot in range(small.first_slot, small.last_slot + 1):
        slot_entries = small.slot_entries(slot)
        attesters = [e for e in slot_entries if e[2].startswith("attestation")]
        entries += slot_entries + (attesters[:node.committee - actual] if attesters else [])
    return entries


def test_rule_fewer_validators_without_missed_slot_costs_20_per_committee() -> None:
    verdict = BASE.analyse(small_committee_entries(BASE, actual=22))
    finding = epoch_finding(verdict, DAMAGED)
    assert finding.validators == 22 and finding.attestation_entries == 32 * 23
    assert finding.score == 98  # 100 - 20 * 2 / 24 = 98.33
    assert finding.rules[0] == "22 distinct validators < 24 expected, no missed slot (-1.667)"
    assert len(finding.inconsistent_slots) == 32  # the doubled entries


def test_rule_fewer_validators_does_not_apply_to_an_epoch_with_a_missed_slot() -> None:
    verdict = BASE.analyse(small_committee_entries(BASE, actual=22, missed_slot=DAMAGED * 32 + 9))
    finding = epoch_finding(verdict, DAMAGED)
    assert not any("distinct validators" in rule for rule in finding.rules)
    assert any("distinct validators" in rule for rule in epoch_finding(verdict, DAMAGED + 1).rules)


def test_score_rounds_half_up_like_go() -> None:
    node = replace(BASE, spe=60, committee=4)
    dropped = list(node.epoch_slots(DAMAGED))[:7]
    finding = epoch_finding(node.analyse(without_slots(node.entries(), dropped)), DAMAGED)
    assert finding.score == 97  # 100 - 30 * 7 / 60 = 96.5; Python's round() would say 96


def test_epoch_verdict_scale() -> None:
    node = replace(BASE, spe=8, committee=4)
    scores = {}
    for dropped in (0, 1, 3, 8):
        verdict = node.analyse(without_slots(node.entries(), list(node.epoch_slots(DAMAGED))[:dropped]))
        finding = epoch_finding(verdict, DAMAGED) if dropped < 8 else None
        scores[dropped] = (finding.score, finding.verdict) if finding else verdict.missing_epochs
    assert scores == {0: (100, "VALID"), 1: (96, "WARNING"), 3: (89, "PARTIAL"), 8: (DAMAGED,)}


def test_an_epoch_scores_zero_at_worst() -> None:
    node = replace(BASE, spe=8, committee=4)
    entries = node.entries()
    slots = node.epoch_slots(DAMAGED)
    entries += [(address(9_000 + i), s, "checkpoint-mined") for s in slots for i in range(3)]
    finding = epoch_finding(node.analyse(entries), DAMAGED)
    assert finding.score == 0 and finding.verdict == "INVALID"


# --------------------------------------------------------------------------- added per-slot checks


def test_missing_slots_are_reported_with_their_numbers() -> None:
    dropped = (DAMAGED * 32 + 1, DAMAGED * 32 + 8)
    verdict = BASE.analyse(without_slots(BASE.entries(), dropped))
    finding = epoch_finding(verdict, DAMAGED)
    assert finding.missing_slots == dropped
    assert "missing slots 353, 360 (no proposer entry)" in finding.rules
    assert any("missing slots 353, 360" in line for line in verdict.findings)
    assert verdict.status == "good" and verdict.score == 99  # epoch 98 (100 - 1.875), mean (100 + 98 + 100) // 3


def test_missing_proposer_entry_with_attestations_left() -> None:
    slot = DAMAGED * 32 + 2
    entries = [e for e in BASE.entries() if not (e[1] == slot and not e[2].startswith("attestation"))]
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.missing_slots == (slot,)
    assert finding.score == 98  # 100 - 0.9375 (proposer rule) - 25 * 23 / 768 (23 stray attestations) = 98.31


def test_one_missing_attestation_entry_still_marks_the_epoch() -> None:
    slot = DAMAGED * 32 + 5
    entries = BASE.entries()
    entries.remove(next(e for e in entries if e[1] == slot and e[2].startswith("attestation")))
    verdict = BASE.analyse(entries)
    finding = epoch_finding(verdict, DAMAGED)
    assert finding.inconsistent_slots == (slot,)
    assert finding.score == 99 and finding.verdict == "WARNING"  # -0.03 would round away
    assert finding.rules[0] == "slot defects worth less than half a point: score held at 99"
    assert verdict.inconsistent_epochs == (DAMAGED,)
    assert verdict.score == 99 and verdict.status == "good"


def test_missed_slot_with_attestations_is_inconsistent() -> None:
    slot = DAMAGED * 32 + 6
    node = replace(BASE, missed=frozenset({slot}))
    entries = node.entries() + [(committee_of(DAMAGED, 24)[0], slot, "attestation-sent")]
    finding = epoch_finding(node.analyse(entries), DAMAGED)
    assert finding.inconsistent_slots == (slot,)
    assert any(rule.startswith(f"slot {slot}: ") and "expected 0" in rule for rule in finding.rules)


def test_two_proposer_entries_for_one_slot_are_inconsistent() -> None:
    slot = DAMAGED * 32 + 7
    entries = BASE.entries() + [(address(5), slot, "checkpoint-missed")]
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.inconsistent_slots == (slot,)
    assert finding.proposer_entries == 33
    assert finding.rules[0] == "proposer entries 33 != 32 slots (-0.9375)"
    assert finding.rules[1].startswith(f"slot {slot}: 2 proposer entries (checkpoint-missed, checkpoint-proposed)")


def test_hole_and_surplus_in_one_epoch_do_not_cancel() -> None:
    hole, double = DAMAGED * 32 + 1, DAMAGED * 32 + 9
    entries = without_slots(BASE.entries(), [hole]) + [(address(5), double, "checkpoint-missed")]
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.proposer_entries == 32
    assert finding.rules[0] == "proposer entries 32 for 32 slots: 1 missing, 1 surplus (-1.875)"
    assert finding.missing_slots == (hole,) and finding.inconsistent_slots == (double,)


def test_a_validator_twice_in_one_slot_is_inconsistent() -> None:
    slot = DAMAGED * 32 + 10
    entries = BASE.entries()
    entries.append(next(e for e in entries if e[1] == slot and e[2] == "attestation-sent"))
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert finding.inconsistent_slots == (slot,)
    assert any("a validator with several entries" in rule for rule in finding.rules)


def test_unconfirmed_checkpoint_may_have_few_attestations_but_not_too_many() -> None:
    slot = DAMAGED * 32 + 11
    node = replace(BASE, flavour="dev", unconfirmed=frozenset({slot}))
    assert epoch_finding(node.analyse(), DAMAGED).score == 100
    extra = [(address(9_000 + i), slot, "attestation-sent") for i in range(13)]  # 11 seen + 13 > 23
    finding = epoch_finding(node.analyse(node.entries() + extra), DAMAGED)
    assert finding.inconsistent_slots == (slot,)
    assert any("expected at most 23" in rule for rule in finding.rules)


def test_slot_defects_are_listed_up_to_a_limit() -> None:
    entries = BASE.entries()
    for slot in BASE.epoch_slots(DAMAGED):
        entries.remove(next(e for e in entries if e[1] == slot and e[2].startswith("attestation")))
    finding = epoch_finding(BASE.analyse(entries), DAMAGED)
    assert len(finding.inconsistent_slots) == 32
    assert finding.rules[-1] == "... and 27 more inconsistent slots"


# --------------------------------------------------------------------------- which epochs are scored


def test_only_the_partial_first_epoch_is_skipped() -> None:
    """The prototype's `break` skipped every epoch; a defect in the first complete one must count."""
    node = replace(BASE, lead_in=10)
    assert_perfect(node.analyse(), node)
    verdict = node.analyse(without_slots(node.entries(), [node.first_epoch * 32 + 3]))
    assert verdict.skipped_epochs == {node.first_epoch - 1: f"partial: before initialSlot {node.first_slot - 1}",
                                      node.current_epoch: "current epoch"}
    assert [e.epoch for e in verdict.epochs] == node.full_epoch_numbers
    assert verdict.inconsistent_epochs == (node.first_epoch,)
    assert verdict.score < 100


def test_an_epoch_starting_right_after_initial_slot_is_complete() -> None:
    node = replace(BASE, lead_in=0)
    verdict = node.analyse()
    assert node.first_epoch in [e.epoch for e in verdict.epochs]


def test_partial_first_epoch_damage_is_ignored() -> None:
    node = replace(BASE, lead_in=10)
    verdict = node.analyse(without_slots(node.entries(), [node.first_slot + 2]))
    assert_perfect(verdict, node)


def test_current_epoch_is_excluded() -> None:
    node = replace(BASE, tail=20)
    verdict = node.analyse(without_slots(node.entries(), [node.current_epoch * 32 + 3]))
    assert_perfect(verdict, node)
    assert verdict.skipped_epochs[node.current_epoch] == "current epoch"


def test_records_after_last_processed_slot_are_not_scored() -> None:
    node = replace(BASE, tail=4)
    future = (node.current_epoch + 1) * 32 + 1
    entries = node.entries() + [(address(1), future, "checkpoint-mined")]
    verdict = node.analyse(entries)
    assert_perfect(verdict, node)
    assert verdict.skipped_epochs[node.current_epoch + 1] == "after lastProcessedSlot"


def test_slot_window_cuts_the_oldest_epochs() -> None:
    node = replace(BASE, full_epochs=4, tail=4)                     # slots 320..451, current epoch 14
    window = 80                                                      # [372, 451]
    entries = without_slots(node.entries(), [321, 330])             # holes older than the window
    verdict = node.analyse(entries, slotWindow=window)
    assert verdict.skipped_epochs == {10: "before the slotWindow start 372", 11: "partial: before the slotWindow start 372",
                                      14: "current epoch"}
    assert [e.epoch for e in verdict.epochs] == [12, 13]
    assert verdict.status == "perfect" and verdict.missing_epochs == ()


def test_restart_gap_before_initial_slot_is_normal() -> None:
    before = replace(BASE, first_epoch=10, full_epochs=2, tail=5)    # an earlier run: epochs 10, 11, part of 12
    after = replace(BASE, first_epoch=15, full_epochs=2, lead_in=27)  # restarted at slot 453 (epoch 14)
    verdict = after.analyse(before.entries() + after.entries())
    assert verdict.missing_epochs == ()
    assert [e.epoch for e in verdict.epochs] == [15, 16]
    assert verdict.skipped_epochs == {10: "before initialSlot 452", 11: "before initialSlot 452",
                                      12: "before initialSlot 452", 14: "partial: before initialSlot 452",
                                      17: "current epoch"}
    assert verdict.status == "perfect"


def test_check_epochs_keeps_the_newest_epochs_with_records() -> None:
    node = replace(BASE, full_epochs=8)
    verdict = node.analyse(params=node.params(check_epochs=3))
    assert [e.epoch for e in verdict.epochs] == [16, 17]  # kept 16, 17, 18; 18 is current
    assert verdict.total_epochs == 9


def test_window_falls_back_to_the_oldest_record() -> None:
    node = replace(BASE, lead_in=5)
    verdict = node.analyse(initialSlot=None, slotWindow=0)
    assert verdict.skipped_epochs[node.first_epoch - 1] == f"partial: before the oldest record (slot {node.first_slot})"
    assert [e.epoch for e in verdict.epochs] == node.full_epoch_numbers


# --------------------------------------------------------------------------- missing epochs, node score


def test_missing_epoch_inside_the_window_costs_4() -> None:
    node = replace(BASE, full_epochs=5)
    verdict = node.analyse(without_slots(node.entries(), node.epoch_slots(12)))
    assert verdict.missing_epochs == (12,)
    assert verdict.score == 96 and verdict.status == "good"
    assert "missing epochs 12: no record inside the history window (-4)" in verdict.findings


def test_epochs_missing_after_the_newest_record_are_missing() -> None:
    node = replace(BASE, full_epochs=5)                              # epochs 10..14, current 15
    dropped = [s for e in (13, 14) for s in node.epoch_slots(e)] + list(node.epoch_slots(15))
    verdict = node.analyse(without_slots(node.entries(), dropped))
    assert verdict.missing_epochs == (13, 14)
    assert verdict.score == 92 and verdict.status == "bad"


def test_node_score_is_the_integer_mean_minus_missing_epochs() -> None:
    node = replace(BASE, full_epochs=4)                              # epochs 10..13
    dropped = list(node.epoch_slots(10))[:4] + list(node.epoch_slots(13))
    verdict = node.analyse(without_slots(node.entries(), dropped))
    assert [e.score for e in verdict.epochs] == [96, 100, 100]       # 13 is gone: not analysed
    # Epoch 13 vanished after the newest kept epoch 12: missing, so (96+100+100)//3 - 4 = 94.
    assert verdict.missing_epochs == (13,)
    assert verdict.score == 94


def test_missing_epochs_count_even_with_nothing_else_to_score() -> None:
    node = replace(BASE, full_epochs=2, lead_in=5)                   # partial 9, full 10 and 11, current 12
    dropped = [s for e in (10, 11) for s in node.epoch_slots(e)]
    verdict = node.analyse(without_slots(node.entries(), dropped))
    assert verdict.epochs == () and verdict.missing_epochs == (10, 11)
    assert (verdict.score, verdict.status) == (92, "bad")            # the prototype's 100 for no epoch, - 2 * 4


@pytest.mark.parametrize("threshold,status", [(98, "good"), (99, "bad"), (100, "bad")])
def test_status_threshold(threshold: int, status: str) -> None:
    node = replace(BASE, full_epochs=3)
    verdict = node.analyse(without_slots(node.entries(), list(node.epoch_slots(10))[:2]),
                           params=node.params(score_threshold=threshold))
    assert verdict.score == 99  # (98 + 100 + 100) // 3
    assert verdict.status == status


@pytest.mark.parametrize("threshold,node_type", [(3, "archiver"), (4, "pruned")])
def test_node_type_threshold(threshold: int, node_type: str) -> None:
    verdict = BASE.analyse(params=BASE.params(archiver_threshold_epochs=threshold))
    assert verdict.total_epochs == 4
    assert verdict.node_type == node_type


# --------------------------------------------------------------------------- unverified, input


def test_sentinel_disabled_is_unverified() -> None:
    verdict = analyse({"stats": {}, "slotWindow": 0}, IntegrityParams())
    assert (verdict.status, verdict.score, verdict.node_type) == ("unverified", 0, "")
    assert "SENTINEL_ENABLED" in verdict.findings[0]
    json.dumps(verdict.to_json())


def test_no_history_is_unverified() -> None:
    answer = {"stats": {address(1): {"history": []}}, "slotWindow": 768, "lastProcessedSlot": 100}
    verdict = analyse(answer, IntegrityParams())
    assert (verdict.status, verdict.score, verdict.node_type) == ("unverified", 0, "")
    assert "no validator history" in verdict.findings[0]


def test_only_partial_and_current_epochs_is_unverified() -> None:
    node = replace(BASE, full_epochs=0, lead_in=12)
    verdict = node.analyse()
    assert (verdict.status, verdict.score, verdict.node_type) == ("unverified", 0, "")
    assert verdict.findings[0].startswith("no complete epoch to score yet")
    assert set(verdict.skipped_epochs) == {node.first_epoch - 1, node.first_epoch}


def test_missing_last_processed_slot_falls_back_to_newest_record() -> None:
    verdict = BASE.analyse(lastProcessedSlot=None)
    assert verdict.last_processed_slot == BASE.last_slot
    assert_perfect(verdict, BASE)
    assert any("no lastProcessedSlot" in line for line in verdict.findings)


def test_string_slots_everywhere() -> None:
    node = replace(BASE, string_slots=True, lead_in=3)
    verdict = node.analyse()
    assert_perfect(verdict, node)
    assert verdict.last_processed_slot == node.last_slot


def test_unknown_extra_fields_are_ignored() -> None:
    answer = BASE.answer(future="field", nested={"a": 1})
    for record in answer["stats"].values():
        record["newCounter"] = 3
        record["history"][0]["extra"] = "x"
    assert analyse(answer, BASE.params()) == BASE.analyse()


def good_entry(**entry: Any) -> dict[str, Any]:
    return {"stats": {address(1): {"history": [entry]}}, "slotWindow": 768}


@pytest.mark.parametrize("answer,message", [
    ([], "expected an object"),
    ("stats", "expected an object"),
    (None, "expected an object"),
    ({}, "'stats' is not an object"),
    ({"stats": []}, "'stats' is not an object"),
    ({"stats": {address(1): []}}, "is not an object"),
    ({"stats": {address(1): {}}}, "history is not a list"),
    ({"stats": {address(1): {"history": {"slot": 1}}}}, "history is not a list"),
    ({"stats": {address(1): {"history": ["x"]}}}, "history[0] is not an object"),
    (good_entry(slot="12a", status="checkpoint-mined"), "history[0].slot"),
    (good_entry(slot=1.5, status="checkpoint-mined"), "history[0].slot"),
    (good_entry(slot=True, status="checkpoint-mined"), "history[0].slot"),
    (good_entry(slot=-1, status="checkpoint-mined"), "history[0].slot"),
    (good_entry(slot="-1", status="checkpoint-mined"), "history[0].slot"),
    (good_entry(status="checkpoint-mined"), "history[0].slot"),
    (good_entry(slot=3, status=5), "history[0].status"),
    (good_entry(slot=3), "history[0].status"),
    ({"stats": {}, "lastProcessedSlot": "soon"}, "lastProcessedSlot"),
    ({"stats": {}, "initialSlot": -3}, "initialSlot"),
    ({"stats": {}, "slotWindow": "wide"}, "slotWindow"),
])
def test_garbage_raises_input_error(answer: Any, message: str) -> None:
    with pytest.raises(IntegrityInputError) as caught:
        analyse(answer, IntegrityParams())
    assert message in str(caught.value)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        IntegrityParams(slots_per_epoch=0)
    with pytest.raises(ValueError):
        IntegrityParams(score_threshold=101)


def test_to_json_is_camel_case_and_serialisable() -> None:
    verdict = BASE.analyse(without_slots(BASE.entries(), [DAMAGED * 32 + 1]))
    document = json.loads(json.dumps(verdict.to_json()))
    assert {"status", "score", "nodeType", "missingEpochs", "inconsistentEpochs", "currentEpoch", "totalEpochs",
            "oldestSlot", "lastProcessedSlot", "epochs", "skippedEpochs", "findings"} == set(document)
    assert document["inconsistentEpochs"] == [DAMAGED]
    assert document["skippedEpochs"] == [{"epoch": BASE.current_epoch, "reason": "current epoch"}]
    epoch = document["epochs"][1]
    assert epoch["epoch"] == DAMAGED and epoch["missingSlots"] == [DAMAGED * 32 + 1]
    assert {"score", "verdict", "validators", "proposerEntries", "attestationEntries", "counts",
            "inconsistentSlots", "rules"} <= set(epoch)


def test_full_size_4x_answer() -> None:
    """~37,000 entries (768 slots × 48), the steady-state size of a 4.x answer."""
    node = replace(BASE, committee=48, first_epoch=1000, full_epochs=23, lead_in=16, tail=16)
    answer = node.answer()
    assert sum(len(r["history"]) for r in answer["stats"].values()) == 768 * 48
    started = time.perf_counter()
    verdict = analyse(answer, node.params())
    elapsed = time.perf_counter() - started
    print(f"analysed {768 * 48} entries in {elapsed * 1000:.1f} ms")
    assert verdict.status == "perfect"
    assert len(verdict.epochs) == 9


# --------------------------------------------------------------------------- properties


@st.composite
def synthetic_nodes(draw: st.DrawFn) -> SyntheticNode:
    spe = draw(st.sampled_from([8, 32]))
    committee = draw(st.integers(2, 48))
    full_epochs = draw(st.integers(1, 5 if spe == 8 else 3))
    first_epoch = draw(st.integers(1, 50))
    flavour = draw(st.sampled_from(sorted(FLAVOURS)))
    span = range((first_epoch - 1) * spe, (first_epoch + full_epochs + 1) * spe)
    missed = draw(st.frozensets(st.sampled_from(span), max_size=spe))
    unconfirmed = draw(st.frozensets(st.sampled_from(span), max_size=spe // 2)) - missed
    return SyntheticNode(spe=spe, committee=committee, first_epoch=first_epoch, full_epochs=full_epochs,
                         lead_in=draw(st.integers(0, spe - 1)), tail=draw(st.integers(1, spe)), flavour=flavour,
                         missed=missed, unconfirmed=unconfirmed, string_slots=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(node=synthetic_nodes())
def test_property_complete_history_is_perfect(node: SyntheticNode) -> None:
    assert_perfect(node.analyse(), node)


@settings(max_examples=60, deadline=None)
@given(node=synthetic_nodes(), data=st.data())
def test_property_removing_a_slot_lowers_the_score_and_names_the_slot(node: SyntheticNode, data: st.DataObject) -> None:
    slot = data.draw(st.integers(node.first_epoch * node.spe, node.current_epoch * node.spe - 1))
    verdict = node.analyse(without_slots(node.entries(), [slot]))
    assert verdict.score < 100
    assert slot in epoch_finding(verdict, slot // node.spe).missing_slots


def damaged(entries: Sequence[Entry], rng: random.Random) -> list[Entry]:
    """Drop, double and rewrite a few entries so the verdict has defects to report."""
    entries = list(entries)
    for _ in range(rng.randint(0, 6)):
        action = rng.choice(("drop", "double", "rewrite"))
        index = rng.randrange(len(entries))
        if action == "drop":
            entries.pop(index)
        elif action == "double":
            entries.append(entries[index])
        else:
            who, slot, _status = entries[index]
            entries[index] = (who, slot, rng.choice(("checkpoint-mined", "blocks-missed", "attestation-sent")))
    return entries


@settings(max_examples=40, deadline=None)
@given(node=synthetic_nodes(), rng=st.randoms(use_true_random=False))
def test_property_order_of_validators_and_entries_does_not_matter(node: SyntheticNode, rng: random.Random) -> None:
    entries = damaged(node.entries(), rng)
    answer = node.answer(entries)
    shuffled_stats = list(answer["stats"].items())
    rng.shuffle(shuffled_stats)
    for _who, record in shuffled_stats:
        rng.shuffle(record["history"])
    shuffled = dict(answer, stats=dict(shuffled_stats))
    assert analyse(shuffled, node.params()) == analyse(node.answer(entries), node.params())


@settings(max_examples=40, deadline=None)
@given(node=synthetic_nodes(), rng=st.randoms(use_true_random=False))
def test_property_verdict_is_well_formed(node: SyntheticNode, rng: random.Random) -> None:
    verdict = node.analyse(damaged(node.entries(), rng))
    assert 0 <= verdict.score <= 100
    assert (verdict.status == "perfect") == (verdict.score == 100)
    assert set(verdict.inconsistent_epochs) == {e.epoch for e in verdict.epochs if e.score < 100}
    assert all(e.score == 100 or e.rules for e in verdict.epochs)
    json.dumps(verdict.to_json())
