"""Cross-node agreement (core/agreement.py): pure, table and property tests."""
import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from sentinel_proxy.core.agreement import (ARCHIVE_ROOT, BLOCK_HASH, Agreement, BlockRef, Report, Tips, analyse,
                                           parse_tips, probe_height)


def h(chain: str, number: int) -> str:
    """The hash of block ``number`` on ``chain`` (0x + 64 hex)."""
    return "0x" + hashlib.sha256(f"{chain}:{number}".encode()).hexdigest()


def tips_doc(finalized: int, chain: str = "main", proven: int | None = None, proposed: int | None = None) -> dict:
    """A 4.x/5.x tips answer on ``chain``."""
    proven = finalized + 10 if proven is None else proven
    proposed = finalized + 20 if proposed is None else proposed

    def tip(n: int) -> dict:
        return {"block": {"number": n, "hash": h(chain, n)}, "checkpoint": {"number": n // 4, "hash": h("cp", n)}}

    return {"proposed": {"number": proposed, "hash": h(chain, proposed)}, "checkpointed": tip(proposed - 2),
            "proven": tip(proven), "finalized": tip(finalized)}


def report(finalized: int, chain: str = "main", archive: int | None = None, **kwargs) -> Report:
    return Report(parse_tips(tips_doc(finalized, chain, **kwargs)),
                  None if archive is None else (archive, h(f"archive-{chain}", archive)))


# -- parsing the tips


def test_parse_tips_4x_and_5x_shape():
    tips = parse_tips(tips_doc(980))
    assert tips == Tips(BlockRef(1000, h("main", 1000)), BlockRef(998, h("main", 998)), BlockRef(990, h("main", 990)),
                        BlockRef(980, h("main", 980)))


def test_parse_tips_2x_shape_and_lenient_values():
    legacy = {"latest": {"number": 50, "hash": "0xAB"}, "proven": {"number": "40", "hash": "0x01"},
              "finalized": {"number": 30, "hash": "0x02"}}
    assert parse_tips(legacy) == Tips(BlockRef(50, "0xab"), None, BlockRef(40, "0x01"), BlockRef(30, "0x02"))


@pytest.mark.parametrize("document", [
    None, "garbage", [], {}, {"proposed": {"number": 1, "hash": "0x1"}},
    {"finalized": {"block": {"number": -1, "hash": "0x1"}}}, {"finalized": {"block": {"number": True, "hash": "0x1"}}},
    {"finalized": {"block": {"number": 1, "hash": "nothex"}}}, {"finalized": {"block": {"number": 1}}},
    {"finalized": {"block": "0x1"}}, {"finalized": {"number": "0x10", "hash": "0x1"}},
])
def test_parse_tips_needs_a_readable_finalized_tip(document):
    assert parse_tips(document) is None


def test_an_unreadable_proven_tip_is_left_out():
    document = tips_doc(980)
    document["proven"] = {"block": {"number": "x"}}
    assert parse_tips(document).proven is None and parse_tips(document).finalized.number == 980


# -- one round


def test_agreeing_nodes_give_majorities_and_nothing_else():
    result = analyse({"a": report(980), "b": report(980), "c": report(980)})
    assert not result.diverged and result.contested is None and result.probe_height is None
    assert result.majority_at(BLOCK_HASH, 980) == h("main", 980)
    assert result.majority_at(BLOCK_HASH, 990) == h("main", 990), "the proven tip votes too"
    assert [(m.height, m.votes, m.voters) for m in result.majorities] == [(980, 3, 3), (990, 3, 3)]


def test_the_minority_is_diverged_with_its_reason():
    result = analyse({"a": report(980), "b": report(980), "c": report(980, chain="fork")})
    assert set(result.diverged) == {"c"} and result.contested is None
    divergence = result.diverged["c"]
    # The highest height it disagrees at is kept: its proven tip.
    assert (divergence.kind, divergence.height, divergence.value, divergence.majority) == (
        BLOCK_HASH, 990, h("fork", 990), h("main", 990))
    assert divergence.reason() == (f"proven tip block 990: hash {h('fork', 990)} differs from the majority's "
                                   f"{h('main', 990)} (2 of 3 nodes)")
    assert divergence.to_json()["reason"] == divergence.reason()


@pytest.mark.parametrize("chains", [("main", "fork"), ("main", "main", "fork", "fork"), ("main", "main", "x", "y")])
def test_no_strict_majority_is_a_contest(chains):
    result = analyse({f"n{i}": report(980, chain) for i, chain in enumerate(chains)})
    assert not result.diverged
    assert result.contested is not None and result.contested.height == 980 and result.contested.kind == BLOCK_HASH
    sides = dict(result.contested.sides)
    assert sides[h("main", 980)] == tuple(f"n{i}" for i, c in enumerate(chains) if c == "main")
    assert "no majority for the block hash at block 980" in result.contested.reason()
    assert result.contested.reason({"n0": "alpha"}).count("alpha") == 1


def test_different_heights_are_not_compared_and_ask_for_a_probe():
    result = analyse({"a": report(980), "b": report(981, chain="fork"), "c": report(985)})
    assert not result.diverged and result.contested is None
    assert result.probe_height == 980, "the lowest finalized height: every node has it"
    assert probe_height({"a": report(980), "b": Report()}) is None, "a node without tips has no height"


def test_archive_roots_are_compared_with_archive_roots_only():
    reports = {"a": report(980, archive=930), "b": report(981, archive=930), "c": report(985, "fork", archive=930)}
    result = analyse(reports)
    assert set(result.diverged) == {"c"} and result.diverged["c"].kind == ARCHIVE_ROOT
    assert result.diverged["c"].reason().startswith("archive root after block 930 0x")
    # A block hash at 930 is not an archive root at 930: no vote against it.
    reports["d"] = Report(Tips(None, None, None, BlockRef(930, h("archive-fork", 930))))
    assert set(analyse(reports).diverged) == {"c"}


def test_a_node_voting_twice_at_one_height_counts_once():
    same = {"a": report(980, proven=980), "b": report(980, proven=980), "c": report(980, "fork", proven=980)}
    result = analyse(same)
    assert [(m.height, m.votes, m.voters) for m in result.majorities] == [(980, 2, 3)]
    assert result.diverged["c"].source == "finalized tip"


# -- across rounds


def test_divergence_is_sticky_until_the_node_agrees_at_or_above_its_height():
    first = analyse({"a": report(980), "b": report(980), "c": report(980, "fork")})
    assert first.diverged["c"].height == 990
    # Not compared (other heights): still diverged.
    second = analyse({"a": report(1000), "b": report(1000), "c": report(1005)}, first.diverged, first.contested)
    assert second.diverged == first.diverged
    # Agreeing below where it diverged proves nothing about the blocks above.
    third = analyse({"a": report(900, proven=900), "b": report(900, proven=900), "c": report(900, proven=900)},
                    second.diverged)
    assert "c" in third.diverged
    # Agreeing at or above it does: its hash there commits to every block below.
    fourth = analyse({"a": report(990), "b": report(990), "c": report(990)}, third.diverged)
    assert not fourth.diverged


def test_a_diverged_node_does_not_vote():
    first = analyse({"a": report(980), "b": report(980), "c": report(980, "fork")})
    # b went down: c cannot tie with a, and a alone is the reference c is held against.
    second = analyse({"a": report(1000), "c": report(1000, "fork")}, first.diverged)
    assert second.contested is None and set(second.diverged) == {"c"}
    assert second.diverged["c"].height == 1010 and second.diverged["c"].voters == 1
    # Nobody left to compare with: the evidence stays.
    assert analyse({"c": report(1000, "fork")}, second.diverged).diverged == second.diverged


def test_the_newest_evidence_is_kept_and_never_a_lower_one():
    first = analyse({"a": report(980), "b": report(980), "c": report(980, "fork")})
    later = analyse({"a": report(1000, archive=930), "b": report(1001, archive=930), "c": report(1002, "fork", archive=930)},
                    first.diverged)
    assert later.diverged["c"].height == 990, "disagreeing at 930 must not lower the bar to clear it"


def test_a_contest_holds_until_two_nodes_agree_at_or_above_it():
    first = analyse({"a": report(980), "b": report(980, "fork")})
    assert first.contested.height == 980
    assert analyse({"a": report(985), "b": report(986)}, contested=first.contested).contested == first.contested
    lone = analyse({"a": report(995)}, contested=first.contested)
    assert lone.contested == first.contested, "one node alone settles nothing"
    lower = analyse({"a": report(970, proven=970), "b": report(970, proven=970)}, contested=first.contested)
    assert lower.contested == first.contested, "agreement below the contested height settles nothing"
    settled = analyse({"a": report(990), "b": report(990), "c": report(990)}, contested=first.contested)
    assert settled.contested is None and not settled.diverged


def test_nothing_to_compare():
    assert analyse({}) == Agreement()
    assert analyse({"a": Report(), "b": Report()}) == Agreement()


# -- properties


heights = st.integers(min_value=0, max_value=5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(heights, heights), min_size=1, max_size=7))
def test_nodes_on_one_chain_always_agree(nodes):
    reports = {f"n{i}": report(1000 + f, proven=1000 + f + p) for i, (f, p) in enumerate(nodes)}
    result = analyse(reports)
    assert not result.diverged and result.contested is None
    assert all(m.value == h("main", m.height) for m in result.majorities)


@settings(max_examples=200, deadline=None)
@given(honest=st.integers(min_value=1, max_value=6), forks=st.integers(min_value=0, max_value=5), height=heights)
def test_an_honest_strict_majority_names_exactly_the_forks(honest, forks, height):
    reports = {f"h{i}": report(1000 + height) for i in range(honest)}
    reports.update({f"f{i}": report(1000 + height, f"fork{i}") for i in range(forks)})
    result = analyse(reports)
    if honest > forks:
        assert set(result.diverged) == {f"f{i}" for i in range(forks)} and result.contested is None
    elif honest + forks >= 2:
        assert result.contested is not None and not result.diverged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(heights, st.sampled_from(["main", "main", "fork", "other"])), min_size=1, max_size=6))
def test_analysing_the_same_round_again_changes_nothing(nodes):
    reports = {f"n{i}": report(1000 + f, chain) for i, (f, chain) in enumerate(nodes)}
    once = analyse(reports)
    twice = analyse(reports, once.diverged, once.contested)
    assert twice.diverged == once.diverged and twice.contested == once.contested
    assert twice.probe_height == once.probe_height
