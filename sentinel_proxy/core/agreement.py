"""Pure: do the healthy nodes agree on the finalized chain? (no Twisted, no I/O)

Every health round hands :func:`analyse` one :class:`Report` per healthy node on the majority
chain: the node's chain tips (``node_getL2Tips`` / ``getChainTips``) and, in the rounds where it
was asked for it, the archive root after a given block. The analysis groups what the nodes said
about the same height, takes the strict majority of each group, and names the nodes that disagree
with it. docs/integrity.md explains the choices; in short:

* Only the ``finalized`` and ``proven`` tips vote: blocks below them do not reorg (finalized never,
  proven only with L1), so two hashes at the same height mean two chains. ``proposed`` and
  ``checkpointed`` blocks may legitimately be replaced and are never compared.
* Like is compared with like: block hashes (from the tips) with block hashes, archive roots (fetched
  when the nodes' finalized heights differ) with archive roots. The archive root after block *n*
  commits to every block hash up to *n*; 4.x has no call that returns a block's hash by number.
* A strict majority of the voters at a height is needed to call anyone diverged (2 of 3, 3 of 4);
  without one (1 against 1, 2 against 2) the height is *contested*: nobody can be trusted there,
  and the gateway makes nothing immutable until a later height settles it.
* A divergence is sticky: finalized blocks do not change, so the evidence stays valid. A diverged
  node no longer votes, and its quarantine lifts only when it agrees with the majority at a height
  at or above the one where it diverged (its hash there commits to everything below).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

#: What is compared: a block's hash (as the tips give it), or the archive root after a block.
BLOCK_HASH = "block hash"
ARCHIVE_ROOT = "archive root"

#: The tips that vote, in the order their entries are read (a node voting twice at one height
#: keeps its first value).
VOTING_TIPS = ("finalized", "proven")

_HEX = re.compile(r"0x[0-9a-fA-F]{1,64}")


@dataclass(frozen=True, slots=True)
class BlockRef:
    number: int
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class Tips:
    """One node's tips; a tip is None when the node did not give a readable ``{number, hash}``."""

    proposed: BlockRef | None
    checkpointed: BlockRef | None
    proven: BlockRef | None
    finalized: BlockRef


def _height(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _hash(value: Any) -> str | None:
    """A hash as ``0x`` + lowercase hex (what ``Fr.toString`` prints), or None."""
    if isinstance(value, str) and _HEX.fullmatch(value):
        return value.lower()
    return None


def _ref(entry: Any) -> BlockRef | None:
    """``{number, hash}``, or the block of ``{block: {number, hash}, checkpoint: ...}`` (4.x, 5.x)."""
    if not isinstance(entry, dict):
        return None
    block = entry.get("block", entry)
    if not isinstance(block, dict):
        return None
    number, hash_ = _height(block.get("number")), _hash(block.get("hash"))
    return None if number is None or hash_ is None else BlockRef(number, hash_)


def parse_tips(document: Any) -> Tips | None:
    """The tips of a ``node_getL2Tips`` (4.x, 2.x/3.x) or ``getChainTips`` (5.x) answer.

    None unless the finalized tip is readable: without it the answer is of no use to the gateway.
    The 2.x/3.x shape calls the proposed tip ``latest`` and has no checkpoints.
    """
    if not isinstance(document, dict):
        return None
    finalized = _ref(document.get("finalized"))
    if finalized is None:
        return None
    proposed = _ref(document.get("proposed", document.get("latest")))
    return Tips(proposed, _ref(document.get("checkpointed")), _ref(document.get("proven")), finalized)


@dataclass(frozen=True, slots=True)
class Report:
    """What one node said this round."""

    tips: Tips | None = None
    #: (n, archive root after block n), when the node was asked (finalized heights differed).
    archive: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class Vote:
    kind: str
    height: int
    value: str
    #: Where the value came from, for the reasons: "finalized tip", "proven tip", "archive".
    source: str


def votes_of(report: Report) -> list[Vote]:
    votes = []
    if report.tips is not None:
        for name in VOTING_TIPS:
            ref = getattr(report.tips, name)
            if ref is not None:
                votes.append(Vote(BLOCK_HASH, ref.number, ref.hash, f"{name} tip"))
    if report.archive is not None:
        height, root = report.archive
        votes.append(Vote(ARCHIVE_ROOT, height, root, "archive"))
    return votes


@dataclass(frozen=True, slots=True)
class Divergence:
    """A node's value at a height differs from the majority's: the node is on another chain."""

    kind: str
    height: int
    value: str
    majority: str
    votes: int
    voters: int
    source: str

    def reason(self) -> str:
        where = f"archive root after block {self.height}" if self.kind == ARCHIVE_ROOT \
            else f"{self.source} block {self.height}: hash"
        return (f"{where} {self.value} differs from the majority's {self.majority} "
                f"({self.votes} of {self.voters} nodes)")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "height": self.height, "hash": self.value, "majority": self.majority,
                "votes": self.votes, "voters": self.voters, "source": self.source, "reason": self.reason()}


@dataclass(frozen=True, slots=True)
class Contest:
    """No strict majority at a height: which nodes said what."""

    kind: str
    height: int
    #: (value, the nodes that said it), most said first.
    sides: tuple[tuple[str, tuple[str, ...]], ...]

    def reason(self, names: Mapping[str, str] | None = None) -> str:
        def said(value: str, nodes: tuple[str, ...]) -> str:
            return f"{', '.join((names or {}).get(n, n) for n in nodes)}: {value}"
        return f"no majority for the {self.kind} at block {self.height} (" + "; ".join(
            said(value, nodes) for value, nodes in self.sides) + ")"

    def to_json(self, names: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {"kind": self.kind, "height": self.height, "reason": self.reason(names),
                "sides": [{"hash": value, "nodes": [(names or {}).get(n, n) for n in nodes]}
                          for value, nodes in self.sides]}


@dataclass(frozen=True, slots=True)
class Majority:
    kind: str
    height: int
    value: str
    votes: int
    voters: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "height": self.height, "hash": self.value, "votes": self.votes,
                "voters": self.voters}


@dataclass(frozen=True)
class Agreement:
    """The outcome of one round, and the state the next round starts from."""

    #: The value a strict majority gave, per compared (kind, height), lowest height first.
    majorities: tuple[Majority, ...] = ()
    #: Every node known to be diverged (new this round or still), by the key it was reported under.
    diverged: Mapping[str, Divergence] = field(default_factory=dict)
    #: A height nobody can be trusted at, until a later majority settles it.
    contested: Contest | None = None
    #: Ask every node for the archive root after this block next round: their finalized heights
    #: differed, so their tips alone compare nothing. None when the tips suffice.
    probe_height: int | None = None

    def majority_at(self, kind: str, height: int) -> str | None:
        return next((m.value for m in self.majorities if m.kind == kind and m.height == height), None)


def probe_height(reports: Mapping[str, Report]) -> int | None:
    """The lowest finalized height among the nodes, when they do not all report the same one.

    Every node has finalized that block, so every node can answer for it (even the one furthest
    behind), and the answers can be compared the next round.
    """
    heights = {r.tips.finalized.number for r in reports.values() if r.tips is not None}
    return min(heights) if len(heights) > 1 else None


def analyse(reports: Mapping[str, Report], diverged: Mapping[str, Divergence] | None = None,
            contested: Contest | None = None) -> Agreement:
    """Majorities, diverged nodes and contested heights, given this round's reports and the
    previous round's diverged nodes and contest (both sticky, see the module docstring)."""
    known = dict(diverged or {})
    groups: dict[tuple[str, int], dict[str, Vote]] = {}
    for key, report in reports.items():
        for vote in votes_of(report):
            groups.setdefault((vote.kind, vote.height), {}).setdefault(key, vote)
    majorities: list[Majority] = []
    fresh: dict[str, Divergence] = {}
    cleared: set[str] = set()
    for (kind, height), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        voters = {key: vote for key, vote in group.items() if key not in known}
        if not voters:
            continue  # only diverged nodes said something here: nothing to hold them against
        counts = Counter(vote.value for vote in voters.values())
        value, votes = counts.most_common(1)[0]
        if 2 * votes <= len(voters):
            if contested is None:
                sides = tuple((v, tuple(sorted(k for k, vote in voters.items() if vote.value == v)))
                              for v, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
                contested = Contest(kind, height, sides)
            continue
        majorities.append(Majority(kind, height, value, votes, len(voters)))
        if contested is not None and height >= contested.height and votes >= 2:
            contested = None  # two or more nodes agree on everything up to here
        for key, vote in group.items():
            if vote.value != value:
                evidence = Divergence(kind, height, vote.value, value, votes, len(voters), vote.source)
                before = fresh.get(key) or known.get(key)
                # The highest height wins: it is the one a node must agree at to be trusted again
                # (and the evidence stays as it was while nothing higher is found).
                fresh[key] = evidence if before is None or height > before.height else before
            elif key in known and height >= known[key].height:
                cleared.add(key)  # agrees at or above where it diverged: its history is the majority's
    result = {key: d for key, d in known.items() if key not in cleared}
    result.update(fresh)  # disagreeing anywhere this round outweighs agreeing elsewhere
    return Agreement(tuple(majorities), result, contested, probe_height(reports))
