"""Backend state, route candidates, credentials handling and the /health helpers (no I/O)."""
import base64
import hashlib
import pickle
from dataclasses import dataclass

from sentinel_proxy.state.backends import (Backend, BackendPool, LatencyWindow, Pick, TipsReport, display_names,
                                           display_url)
from sentinel_proxy.state.status import NEVER, RequestTotals, backend_document, health_document, rfc3339


def test_latency_window_keeps_the_last_hundred():
    window = LatencyWindow()
    assert (window.average, window.minimum, window.maximum) == (0.0, 0.0, 0.0)
    for value in range(1, 151):
        window.add(float(value))
    assert (window.minimum, window.maximum, window.average) == (51.0, 150.0, 100.5)


def test_credentials_become_basic_auth_and_are_never_shown():
    backend = Backend("https://alice:s%40cret@node.example:8443/rpc")
    assert backend.label == backend.name == "https://node.example:8443"
    assert backend.target == b"https://node.example:8443/rpc"
    assert backend.authorization == b"Basic " + base64.b64encode(b"alice:s@cret")
    assert "alice" not in repr(backend) and "cret" not in repr(backend) and "/rpc" not in repr(backend)
    plain = Backend("http://node:8080")
    assert (plain.label, plain.target, plain.authorization) == ("http://node:8080", b"http://node:8080/", None)
    assert (Backend("https://n").name, Backend("https://n", "archiver-1").label) == ("https://n:443", "archiver-1")
    assert display_url("http://[::1]:8080") == "http://[::1]:8080"
    assert display_url("http://TOKEN@node/v1/KEY?key=K") == "http://node:80"
    assert Backend("http://[::1]:8080").target == b"http://[::1]:8080/"


def test_display_names_keep_configured_names_and_tell_shared_hosts_apart():
    entries = [("", "http://h:1/v1/A"), ("main", "http://h:1/v1/B"), ("", "http://u:p@h:1"), ("", "http://h:1/v1/C"),
               ("", "https://h:1/")]
    assert display_names(entries) == ["http://h:1", "main", "http://h:1#2", "http://h:1#3", "https://h:1"]
    pool = BackendPool(entries)
    assert [b.name for b in pool.backends] == display_names(entries)
    assert pool.find("h:1#2") is pool.backends[2] and pool.find("http://h:1#3") is pool.backends[3]
    assert pool.find("main") is pool.backends[1] and pool.find("") is None and pool.find("v1/A") is None


def test_a_reload_renames_a_node_it_keeps():
    pool = BackendPool(["http://h:1/v1/A"])
    kept = pool.backends[0]
    kept.total_requests = 7
    pool.replace([("", "http://h:1/v1/B"), ("first", "http://h:1/v1/A")])
    assert pool.backends[1] is kept and kept.name == "first" and kept.total_requests == 7
    assert pool.backends[0].name == "http://h:1"


@dataclass(frozen=True)
class Verdict:
    """Stands in for an IntegrityVerdict: only what the pool reads."""

    status: str = "perfect"
    node_type: str = "pruned"
    missing_epochs: tuple = ()
    inconsistent_epochs: tuple = ()


def healthy_pool(count, **kwargs):
    pool = BackendPool([f"http://n{i}:1" for i in range(count)], random=lambda: 0.0, **kwargs)
    for backend in pool.backends:
        pool.record_health(backend, True, now=1.0, block_number=100, latency_ms=5.0)
    return pool


def test_only_healthy_nodes_of_the_route_type_are_candidates():
    pool = BackendPool(["http://a:1", "http://b:1", "http://c:1"], random=lambda: 0.0)
    a, b, c = pool.backends
    assert pool.pick("/") == Pick(None), "unchecked nodes get no traffic"
    pool.record_health(a, True, now=1.0, block_number=10, latency_ms=5.0, oldest_block=1)
    pool.record_health(b, True, now=1.0, block_number=10, latency_ms=5.0, oldest_block=5)
    pool.record_health(c, False, now=1.0, error="node_isReady answered False")
    for backend in (a, b):
        pool.record_integrity(backend, Verdict())
    assert (a.node_type, b.node_type) == ("archiver", "pruned"), "world-state depth decides the type"
    assert pool.candidates("/") == [a, b]
    assert pool.candidates("/archiver") == [a] and pool.pick("/archiver") == Pick(a)
    assert pool.candidates("/pruned") == [b]
    assert c.checked_down and not Backend("http://d:1").checked_down
    assert pool.any_healthy


def test_untrusted_nodes_serve_only_as_a_fallback():
    pool = healthy_pool(3)
    good, bad, unverified = pool.backends
    pool.record_integrity(good, Verdict("good"))
    pool.record_integrity(bad, Verdict("bad", missing_epochs=(3,)))
    pool.record_integrity(unverified, Verdict("unverified", node_type=""))
    assert [pool.pick("/") for _ in range(3)] == [Pick(good)] * 3
    pool.record_health(good, False, now=2.0, error="down")
    assert pool.pick("/").backend in (bad, unverified) and pool.pick("/").fallback == "integrity"
    assert [b.routing for b in pool.backends] == ["down", "fallback", "fallback"]


def test_block_requirements_pick_a_node_that_keeps_the_block():
    pool = healthy_pool(2)
    archiver, pruned = pool.backends
    pool.record_health(archiver, True, now=1.0, block_number=100, oldest_block=1)
    pool.record_health(pruned, True, now=1.0, block_number=100, oldest_block=60)
    for backend in pool.backends:
        pool.record_integrity(backend, Verdict())
    assert {pool.pick("/", 10).backend for _ in range(20)} == {archiver}
    assert pool.history_floor("/") == 1 and pool.history_floor("/pruned") == 60
    pool.record_health(archiver, False, now=2.0)
    assert pool.pick("/", 10) == Pick(None) and pool.history_floor("/") == 60
    assert pool.pick("/", 60) == Pick(pruned)


def test_reassess_quarantines_lagging_and_foreign_nodes():
    pool = healthy_pool(4, max_block_lag=10)
    a, b, c, d = pool.backends
    for backend, block, chain in ((a, 100, ("1", "1")), (b, 91, ("1", "1")), (c, 89, ("1", "1")),
                                  (d, 500, ("1", "2"))):
        pool.record_health(backend, True, now=1.0, block_number=block, chain=chain)
        pool.record_integrity(backend, Verdict())
    pool.reassess()
    assert not a.quarantine and not b.quarantine and b.lag == 9
    assert set(c.quarantine) == {"lag"} and c.lag == 11
    assert set(d.quarantine) == {"chain"}
    assert pool.candidates("/") == [a, b]
    pool.record_health(c, True, now=2.0, block_number=100)
    pool.reassess()
    assert not c.quarantine and pool.candidates("/") == [a, b, c]


def test_chain_identity_carries_the_majority_protocol_contracts_hash():
    pool = healthy_pool(5)
    a, b, c, d, e = pool.backends
    for backend in (a, b, c):
        pool.record_health(backend, True, now=1.0, block_number=100, chain=("1", "7"))
    pool.reassess()
    assert pool.chain_identity() == ("1", "7"), "no node reports a hash (older nodes): the 2-tuple"
    pool.record_health(a, True, now=2.0, block_number=100, chain=("1", "7"), protocol_contracts="0xaa")
    pool.record_health(b, True, now=2.0, block_number=100, chain=("1", "7"), protocol_contracts="0xaa")
    pool.record_health(c, True, now=2.0, block_number=100, chain=("1", "7"), protocol_contracts="0xbb")
    # Two nodes of another chain, with the hash of the minority: no say on the hash.
    pool.record_health(d, True, now=2.0, block_number=100, chain=("1", "8"), protocol_contracts="0xbb")
    pool.record_health(e, True, now=2.0, block_number=100, chain=("1", "8"), protocol_contracts="0xbb")
    pool.reassess()
    assert pool.chain_identity() == ("1", "7", "0xaa"), "a node with another hash does not change the majority"
    assert a.chain == ("1", "7") and not c.quarantine, "the chain (and its quarantine) stays a 2-tuple"
    assert set(d.quarantine) == {"chain"}
    pool.record_health(b, False, now=3.0, error="down")
    pool.reassess()
    assert pool.chain_identity() is None, "a tie between hashes: no identity, nothing cached"
    pool.record_health(b, True, now=4.0, block_number=100)
    pool.reassess()
    assert pool.chain_identity() == ("1", "7", "0xaa"), "a round without the header keeps the known hash"
    assert backend_document(a)["protocolContracts"] == "0xaa" and backend_document(a)["chain"] == {
        "l1ChainId": "1", "rollupVersion": "7"}


def test_workers_snapshot_carries_the_protocol_contracts_hash():
    leader = BackendPool([("a", "http://a:1"), ("b", "http://b:1")])
    a, b = leader.backends
    leader.record_health(a, True, now=5.0, block_number=42, chain=("1", "1"), protocol_contracts="0xaa")
    leader.record_health(b, False, now=5.0, error="down")
    leader.reassess()
    follower = BackendPool([])
    snapshot = pickle.loads(pickle.dumps(leader.snapshot()))
    follower.replace(snapshot["entries"])
    follower.apply(snapshot)
    assert follower.backends[0].protocol_contracts == "0xaa"
    assert follower.chain_identity() == leader.chain_identity() == ("1", "1", "0xaa")


def test_priority_follows_state_changes():
    pool = BackendPool(["http://a:1"])
    backend = pool.backends[0]
    assert backend.priority == 110  # unchecked: no latency samples, not healthy
    pool.record_health(backend, True, now=1.0, block_number=5, latency_ms=250.0)
    assert backend.priority == 125
    pool.record_health(backend, False, now=2.0, error="down")
    assert backend.priority == 105 and backend.last_error == "down" and backend.block_number == 5


def test_replace_keeps_the_state_of_nodes_that_stay():
    pool = BackendPool(["http://a:1", "http://b:1"])
    pool.record_health(pool.backends[0], True, now=1.0, block_number=7)
    kept = pool.backends[0]
    pool.replace(["http://c:1", "http://a:1"])
    assert [b.url for b in pool.backends] == ["http://c:1", "http://a:1"]
    assert pool.backends[1] is kept and kept.block_number == 7


def test_rfc3339():
    assert rfc3339(None) == NEVER
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"


def test_pick_skips_tried_nodes_and_open_breakers_but_never_strands_the_route():
    pool = healthy_pool(2)
    a, b = pool.backends
    for backend in pool.backends:
        pool.record_integrity(backend, Verdict())
    assert pool.pick("/", exclude=[a]) == Pick(b)
    assert pool.pick("/", exclude=[a, b]) == Pick(None)
    for _ in range(5):
        a.breaker.record(False, now=10.0)
    assert a.breaker.state == "open"
    assert {pool.pick("/", now=11.0).backend for _ in range(10)} == {b}
    for _ in range(5):
        b.breaker.record(False, now=10.0)
    assert pool.pick("/", now=11.0).fallback == "breaker"
    assert pool.pick("/", now=16.0).fallback is None, "after the cool-down, probes are regular picks"


# -- cross-node agreement (core/agreement.py) in the pool


def tips(finalized, chain="main", proven=None):
    """A tips answer whose hashes depend on the chain: nodes on one chain agree on every hash."""
    def ref(n):
        return {"number": n, "hash": "0x" + hashlib.sha256(f"{chain}:{n}".encode()).hexdigest()}
    proven = finalized + 10 if proven is None else proven
    return {"proposed": ref(finalized + 20), "checkpointed": {"block": ref(finalized + 18), "checkpoint": ref(1)},
            "proven": {"block": ref(proven), "checkpoint": ref(2)}, "finalized": {"block": ref(finalized),
                                                                                  "checkpoint": ref(3)}}


def round_of(pool, *rounds, now=1.0):
    """One health round: (backend, block number, tips answer or None) for each node, then reassess."""
    for backend, block, answer in rounds:
        report = TipsReport("node_getL2Tips", answer is not None, None if answer is not None else "gone")
        pool.record_health(backend, True, now=now, block_number=block, tips=answer, tips_report=report)
    pool.reassess()


def test_a_diverged_node_is_quarantined_and_has_no_say_in_the_finalized_tip():
    pool = healthy_pool(3)
    a, b, c = pool.backends
    for backend in pool.backends:
        pool.record_integrity(backend, Verdict())
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(980)), (c, 1000, tips(980, "fork")))
    assert set(c.quarantine) == {"diverged"} and c.routing == "quarantined"
    assert "proven tip block 990: hash 0x" in c.quarantine["diverged"] and "(2 of 3 nodes)" in c.quarantine["diverged"]
    assert c.divergence.height == 990 and a.divergence is None
    assert pool.candidates("/") == [a, b] and pool.finalized == 980
    # c runs ahead on its own chain: it sets no bar for lag and does not move the finalized tip
    # (counted, its 990 with b's 985 would make 985 a majority of three).
    round_of(pool, (a, 1000, tips(980)), (b, 1005, tips(985)), (c, 1500, tips(990, "fork")))
    assert set(c.quarantine) == {"diverged"} and a.lag == 5 and not a.quarantine
    assert pool.finalized == 980
    # Back on the majority's chain at a height at or above the evidence: trusted again.
    round_of(pool, (a, 1030, tips(1010)), (b, 1030, tips(1010)), (c, 1030, tips(1010)))
    assert not c.quarantine and c.divergence is None and pool.finalized == 1010


def test_a_contested_height_makes_nothing_final():
    pool = healthy_pool(2)
    a, b = pool.backends
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(980, "fork")))
    assert pool.finalized is None and pool.agreement.contested.height == 980
    assert not a.quarantine and not b.quarantine, "one against one: nobody can tell which is right"
    # Both move on to heights that compare nothing: the contest holds.
    round_of(pool, (a, 1010, tips(990)), (b, 1011, tips(991)))
    assert pool.finalized is None
    round_of(pool, (a, 1020, tips(1000)), (b, 1020, tips(1000)))
    assert pool.agreement.contested is None and pool.finalized == 1000


def test_a_contest_names_nodes_by_display_name_even_after_a_key_rotation():
    pool = BackendPool(["http://u:OLDPASS@a:1/v1/OLDKEY", "http://b:1/v1/BKEY"])
    a, b = pool.backends
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(980, "fork")))
    pool.replace(["http://u:NEWPASS@a:1/v1/NEWKEY", "http://b:1/v1/BKEY"])
    assert pool.agreement.contested is not None, "the contest is sticky across the reload"
    shown = repr(health_document(pool, RequestTotals(), 1.0)["agreement"])
    assert "http://a:1" in shown and "http://b:1" in shown
    assert not any(secret in shown for secret in ("OLDPASS", "OLDKEY", "NEWPASS", "NEWKEY", "BKEY", "u:"))


def test_a_node_whose_tips_stopped_vouches_for_nothing():
    pool = healthy_pool(3)
    a, b, c = pool.backends
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(990)), (c, 1000, tips(990)))
    assert pool.finalized == 990
    # c's tips stop: its old answer must not keep voting.
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(990)), (c, 1000, None))
    assert c.tips is None and c.tips_report.ok is False and pool.finalized == 980
    # Without a tips report (an older caller), tips=None leaves the last answer in place.
    pool.record_health(c, True, now=2.0, block_number=1000, tips=tips(990))
    pool.record_health(c, True, now=3.0, block_number=1000)
    assert c.tips == tips(990)


def test_agreement_state_reaches_the_other_workers():
    pool = healthy_pool(3)
    a, b, c = pool.backends
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(980)), (c, 1000, tips(980, "fork")))
    follower = BackendPool([backend.url for backend in pool.backends])
    follower.apply(pickle.loads(pickle.dumps(pool.snapshot())))
    assert follower.finalized == 980 and follower.agreement == pool.agreement
    assert follower.backends[2].divergence == c.divergence and follower.backends[2].tips_report == c.tips_report
    assert follower.candidates("/") == [follower.backends[0], follower.backends[1]]


def test_health_document_shows_tips_and_divergence():
    pool = healthy_pool(3)
    a, b, c = pool.backends
    round_of(pool, (a, 1000, tips(980)), (b, 1000, tips(980)), (c, 1000, tips(980, "fork")))
    document = health_document(pool, RequestTotals(), 1.0)
    first, _, forked = document["backends"]
    assert first["tips"] == {"method": "node_getL2Tips", "ok": True, "error": None,
                             "finalized": tips(980)["finalized"]["block"], "proven": tips(980)["proven"]["block"]}
    assert forked["divergence"]["height"] == 990 and forked["divergence"]["majority"] == tips(980)["proven"]["block"]["hash"]
    assert forked["quarantine"]["diverged"] == forked["divergence"]["reason"]
    assert document["agreement"]["finalized"] == 980 and document["agreement"]["contested"] is None
    assert [m["height"] for m in document["agreement"]["compared"]] == [980, 990]
    assert BackendPool(["http://x:1"]).backends[0].tips_report is None
    assert backend_document(BackendPool(["http://x:1"]).backends[0])["tips"] is None
