"""The checks, in memory: the real treq control client over ``RequestTraversalAgent`` to simulated
nodes, and ``task.Clock`` for the loops and the deadlines. No sockets, no sleeps."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any, Callable

import pytest
from treq.testing import RequestTraversalAgent, StringStubbingResource
from twisted.internet import defer, task
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sentinel_proxy.checks import CheckClient, block_number_of, chain_of, oldest_block_of
from sentinel_proxy.checks.health import protocol_contracts_of
from sentinel_proxy.checks.client import RpcCallError
from sentinel_proxy.checks.health import HEALTH_CALLS, TIPS_METHODS, archive_call, archive_of
from sentinel_proxy.interfaces import ICheckClient
from sentinel_proxy.state.backends import TipsReport
from sentinel_proxy.state.status import backend_document, health_document, RequestTotals
from sentinel_proxy.upstream.client import UpstreamError
from sentinel_simnode.node import SCENARIOS, SimulatedNode
from tests.checks_support import CHAIN, PARAMS, Setup, TIMEOUT, simulated


class Recording(Resource):
    """Passes requests to ``inner`` and keeps what went over the wire: headers both ways, path."""

    isLeaf = True

    def __init__(self, inner: Resource):
        super().__init__()
        self.inner = inner
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Any) -> Any:
        out = self.inner.render(request)
        self.seen.append({"path": request.path, "request": request.requestHeaders, "response": request.responseHeaders})
        return out


class Reordering(Resource):
    """A node that answers a batch back to front (allowed by JSON-RPC)."""

    isLeaf = True

    def __init__(self, node: SimulatedNode):
        super().__init__()
        self.node = node

    def render(self, request: Any) -> bytes:
        status, body = self.node.handle_body(request.content.read())
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(json.loads(body)[::-1]).encode()


class Stalling(Resource):
    """Sends the headers and the start of a long body, then nothing."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[Any] = []

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"100000")
        request.write(b"[" + b" " * 1000)
        request.notifyFinish().addErrback(self.lost.append)
        return NOT_DONE_YET


def scripted(answer: Callable[[list[dict[str, Any]]], Any], code: int = 200,
             headers: dict[bytes, bytes] | None = None) -> StringStubbingResource:
    """A node whose batch answer is ``answer(calls)``, serialised unless it is already bytes."""
    def respond(method: bytes, url: str, params: Any, request_headers: Any, data: bytes) -> tuple:
        out = answer(json.loads(data))
        return code, headers or {b"content-type": b"application/json"}, out if isinstance(out, bytes) else json.dumps(out).encode()

    return StringStubbingResource(respond)


def answers(results: dict[str, Any]) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Answer each call with ``results[method]``: a result, or an exception for an error answer."""
    def answer(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for call in calls:
            value = results.get(call["method"], Exception("Method not found"))
            if isinstance(value, Exception):
                out.append({"jsonrpc": "2.0", "id": call["id"], "error": {"code": -32601, "message": str(value)}})
            else:
                out.append({"jsonrpc": "2.0", "id": call["id"], "result": value})
        return out

    return answer


def messages(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in events if "log_format" in e and text in e["log_format"]]


def other_hash(value: str) -> str:
    return "0x" + hashlib.sha256(value.encode()).hexdigest()


def forked(node: SimulatedNode) -> SimulatedNode:
    """Put ``node`` on another chain from its finalized blocks down: other hashes in its tips (proven
    and finalized) and other archive roots, whatever the dialect. Same chain id and rollup version."""
    def rewrite(handler: Callable[..., Any], change: Callable[[dict], None]) -> Callable[..., Any]:
        def answer(params: list[Any], state: Any) -> bytes | None:
            body = handler(params, state)
            if body is None:
                return None
            document = json.loads(body)
            change(document)
            return json.dumps(document).encode()
        return answer

    def tips(document: dict) -> None:
        for name in ("proven", "finalized"):
            document[name]["block"]["hash"] = other_hash(document[name]["block"]["hash"])

    def header(document: dict) -> None:
        document["lastArchive"]["root"] = other_hash(document["lastArchive"]["root"])

    def data(document: dict) -> None:
        document["archive"]["root"] = other_hash(document["archive"]["root"])

    for name, handler in list(node.handlers.items()):
        change = {"getL2Tips": tips, "getChainTips": tips, "getBlockHeader": header,
                  "getBlockData": data}.get(name.partition("_")[2])
        if change is not None:
            node.handlers[name] = rewrite(handler, change)
    return node


# ------------------------------------------------------------------------------ health


def test_health_check_runs_at_start_and_every_interval():
    clock = task.Clock()
    nodes = {name: simulated(scenario, clock) for name, scenario in (
        ("good", "pruned"), ("notready", "not-ready"), ("down", "failing-500"), ("garbage", "failing-garbage"),
        ("reset", "failing-reset"))}
    setup = Setup(clock, nodes)
    service = setup.health()
    service.startService()
    good, notready, down, garbage, reset = setup.pool.backends
    assert good.healthy and good.block_number == 1000 and good.chain == ("31337", "1")
    assert not notready.healthy and "node_isReady answered False" in notready.last_error
    assert not down.healthy and down.last_error == "HTTP 500"
    assert not garbage.healthy and garbage.last_error == "batch: answer is not JSON"
    assert not reset.healthy and "connection failed" in reset.last_error
    nodes["down"].scenario = "pruned"
    clock.advance(30.0)
    assert down.healthy and down.block_number == 1000
    # One batch per node and round, every call of HEALTH_CALLS in it; every tips method in the
    # first (none known yet), only the one that answered in the next.
    assert nodes["good"].requests == 2
    assert dict(nodes["good"].calls) == {**{method: 2 for method, _ in HEALTH_CALLS}, "node_getL2Tips": 2,
                                         **{method: 1 for method in TIPS_METHODS[1:]}}
    service.stopService()


def test_health_round_reads_chain_depth_and_quarantines():
    clock = task.Clock()
    nodes = {name: simulated(name, clock) for name in ("archiver", "pruned", "lagging", "other-rollup")}
    setup = Setup(clock, nodes, max_block_lag=10)
    service = setup.health()
    service.startService()
    archiver, pruned, lagging, other = setup.pool.backends
    assert (archiver.oldest_block, pruned.oldest_block) == (1, 936)
    assert (archiver.node_type, pruned.node_type) == ("archiver", "pruned")
    assert lagging.lag == 50 and "50 blocks behind" in lagging.quarantine["lag"]
    assert "rollupVersion 2" in other.quarantine["chain"] and "lag" not in other.quarantine
    assert [b.routing for b in setup.pool.backends] == ["fallback", "fallback", "quarantined", "quarantined"]
    service.stopService()


def test_answers_are_matched_by_id_not_position():
    clock = task.Clock()
    setup = Setup(clock, {"a": Reordering(simulated("pruned", clock))})
    service = setup.health()
    service.startService()
    a = setup.backends["a"]
    assert a.healthy and a.block_number == 1000 and a.oldest_block == 936 and a.chain == ("31337", "1")
    service.stopService()


def test_the_protocol_contracts_hash_is_read_from_the_header():
    clock = task.Clock()
    setup = Setup(clock, {"a": simulated("pruned", clock), "b": simulated("pruned", clock, dialect="5")})
    service = setup.health()
    service.startService()
    a, b = setup.pool.backends
    seen = a.protocol_contracts
    assert seen is not None and seen.startswith("0x") and len(seen) == 66, "x-aztec-l2ProtocolContractsHash"
    assert b.protocol_contracts == seen and a.chain == b.chain == ("31337", "1")
    assert setup.pool.chain_identity() == ("31337", "1", seen)
    service.stopService()


def test_error_answers_fail_only_the_calls_that_decide_health():
    headers = {b"content-type": b"application/json", b"x-aztec-l1ChainId": b"1", b"x-aztec-rollupVersion": b"7"}
    clock = task.Clock()
    setup = Setup(clock, {
        # Optional calls unknown to an old node: healthy, chain identity from the headers.
        "old": scripted(answers({"node_isReady": True, "node_getBlockNumber": "12"}), headers=headers),
        "notready": scripted(answers({"node_isReady": Exception("not synced"), "node_getBlockNumber": 1})),
        "noblock": scripted(answers({"node_isReady": True})),
    })
    service = setup.health()
    service.startService()
    old, notready, noblock = setup.pool.backends
    assert old.healthy and old.block_number == 12 and old.chain == ("1", "7") and old.oldest_block is None
    assert old.protocol_contracts is None, "no x-aztec-l2ProtocolContractsHash header: an older node"
    assert setup.pool.chain_identity() == ("1", "7")
    assert not notready.healthy and "node_isReady: error" in notready.last_error and "not synced" in notready.last_error
    assert not noblock.healthy and "node_getBlockNumber: error" in noblock.last_error
    service.stopService()


@pytest.mark.parametrize("answer, reason", [
    (b"<html>502 Bad Gateway</html>", "batch: answer is not JSON"),
    ({"jsonrpc": "2.0", "id": 0, "result": True}, "batch: answer is not a JSON array"),
    ([], "node_isReady: no JSON-RPC answer"),
    ([1, "x", None, {"id": [0]}, {"id": True, "result": True}], "node_isReady: no JSON-RPC answer"),
    ([{"jsonrpc": "2.0", "id": 0}], "node_isReady: no result"),
    ([{"jsonrpc": "2.0", "id": 0, "result": True}, {"jsonrpc": "2.0", "id": 1, "result": {"no": 1}}],
     "node_getBlockNumber: not a number"),
])
def test_garbage_answers_make_the_node_unhealthy(answer, reason):
    clock = task.Clock()
    setup = Setup(clock, {"a": scripted(lambda calls: answer)})
    service = setup.health()
    service.startService()
    a = setup.backends["a"]
    assert not a.healthy and a.last_check is not None and reason in a.last_error
    service.stopService()


def test_a_corrupt_gzip_answer_fails_at_once():
    clock = task.Clock()
    headers = {b"content-type": b"application/json", b"content-encoding": b"gzip"}
    setup = Setup(clock, {"a": scripted(lambda calls: b"not gzip" * 100, headers=headers)})
    service = setup.health()
    service.startService()
    assert not setup.backends["a"].healthy and "connection failed" in setup.backends["a"].last_error
    service.stopService()


def test_http_errors_fail_the_check_whatever_the_body():
    clock = task.Clock()
    setup = Setup(clock, {"a": scripted(answers({"node_isReady": True, "node_getBlockNumber": 1}), code=503)})
    service = setup.health()
    service.startService()
    assert not setup.backends["a"].healthy and setup.backends["a"].last_error == "HTTP 503"
    service.stopService()


def test_the_deadline_fails_the_check_and_closes_the_connection():
    clock = task.Clock()
    node = simulated("hang", clock)
    setup = Setup(clock, {"a": node})
    service = setup.health()
    service.startService()
    a = setup.backends["a"]
    assert a.last_check is None and node.in_flight == 1
    clock.advance(TIMEOUT - 0.1)
    assert a.last_check is None
    clock.advance(0.1)
    assert not a.healthy and a.last_error == f"no answer within {TIMEOUT:g} s"
    setup.agent.flush()
    assert node.in_flight == 0, "the node still holds the abandoned request: the connection was left open"
    service.stopService()


def test_the_deadline_covers_the_body_too():
    stalling = Stalling()
    clock = task.Clock()
    setup = Setup(clock, {"a": stalling})
    service = setup.health()
    service.startService()
    setup.clock.advance(TIMEOUT)
    assert setup.backends["a"].last_error == f"no answer within {TIMEOUT:g} s"
    setup.agent.flush()
    assert len(stalling.lost) == 1, "the connection to a node stalling mid-body was left open"
    service.stopService()


def test_stop_cancels_a_check_stuck_on_a_hanging_node():
    clock = task.Clock()
    node = simulated("hang", clock)
    setup = Setup(clock, {"a": node})
    service = setup.health()
    service.startService()
    stopped = service.stopService()
    assert stopped.called, "shutdown waited for a hanging check"
    setup.agent.flush()
    assert node.in_flight == 0
    assert setup.backends["a"].last_check is None, "a check stopped at shutdown is not the node's failure"


@implementer(ICheckClient)
class CrashingOnce:
    """A check client whose first call hits a bug (not a node failure)."""

    def __init__(self, client: CheckClient):
        self.client = client
        self.crashed = False

    def crash_once(self) -> None:
        if not self.crashed:
            self.crashed = True
            raise ZeroDivisionError("bug")

    async def batch(self, backend: Any, calls: Any, timeout: float) -> Any:
        self.crash_once()
        return await self.client.batch(backend, calls, timeout)

    async def fetch(self, backend: Any, body: bytes, timeout: float) -> Any:
        self.crash_once()
        return await self.client.fetch(backend, body, timeout)


def test_a_crashing_check_does_not_stop_the_loop():
    clock = task.Clock()
    setup = Setup(clock, {"a": simulated("pruned", clock)})
    client = CrashingOnce(setup.client)
    verifyObject(ICheckClient, client)
    service = setup.health(client)
    service.startService()
    assert client.crashed and setup.backends["a"].last_check is None
    setup.clock.advance(30.0)
    assert setup.backends["a"].healthy
    assert service.running and service._loop.running
    service.stopService()


def test_credentials_in_the_url_go_as_basic_auth_to_the_node_s_own_path():
    clock = task.Clock()
    recording = Recording(scripted(answers({"node_isReady": True, "node_getBlockNumber": 7})))
    setup = Setup(clock, {"a": recording})
    setup.pool.replace(["http://user:s%40cret@a:1/rpc"])
    service = setup.health()
    service.startService()
    assert setup.pool.backends[0].healthy
    seen = recording.seen[0]
    assert seen["path"] == b"/rpc"
    assert seen["request"].getRawHeaders(b"authorization") == [b"Basic " + base64.b64encode(b"user:s@cret")]
    assert seen["request"].getRawHeaders(b"host") == [b"a:1"]
    assert seen["request"].getRawHeaders(b"content-type") == [b"application/json"]
    service.stopService()


# ------------------------------------------------------------------------------ tips across versions


def test_the_tips_method_is_detected_per_node_and_remembered(logged):
    clock = task.Clock()
    nodes = {"v4": simulated("pruned", clock), "v5": simulated("pruned", clock, dialect="5"),
             "legacy": simulated("legacy", clock)}
    setup = Setup(clock, nodes)
    service = setup.health()
    service.startService()
    v4, v5, legacy = setup.pool.backends
    assert (v4.tips_method, v5.tips_method, legacy.tips_method) == ("node_getL2Tips", "node_getChainTips",
                                                                    "node_getL2Tips")
    assert all(b.tips_report == TipsReport(b.tips_method, True) for b in setup.pool.backends)
    # A 5.x node alone is enough for a finalized tip: caching of immutable blocks goes on.
    assert v5.tips["finalized"]["block"]["number"] == 980 and setup.pool.finalized == 980
    clock.advance(30.0)
    assert nodes["v5"].calls["node_getChainTips"] == 2 and nodes["v5"].calls["node_getL2Tips"] == 1
    assert nodes["v5"].calls["aztec_getChainTips"] == 1, "asked once, while no method was known"
    assert nodes["v5"].requests == 2, "one batch per round"
    assert [e["method"] for e in messages(logged, "reports its tips with {method}")] == [
        "node_getL2Tips", "node_getChainTips", "node_getL2Tips"], "once per node, not per round"
    service.stopService()


def test_the_5x_namespace_alone_is_enough():
    clock = task.Clock()
    node = simulated("pruned", clock, dialect="5")
    for name in [n for n in node.handlers if n.endswith("Tips")]:
        if name.startswith("node_"):
            del node.handlers[name]  # a 5.x node without the legacy alias of the tips method
    setup = Setup(clock, {"a": node})
    service = setup.health()
    service.startService()
    assert setup.backends["a"].tips_method == "aztec_getChainTips" and setup.pool.finalized == 980
    service.stopService()


def test_a_remembered_method_answering_32601_is_detected_again_in_the_same_round(logged):
    clock = task.Clock()
    old = simulated("pruned", clock)
    setup = Setup(clock, {"a": old})
    service = setup.health()
    service.startService()
    a = setup.backends["a"]
    assert a.tips_method == "node_getL2Tips" and setup.pool.finalized == 980
    # The node behind the URL is upgraded to 5.x: node_getL2Tips is gone.
    new = simulated("pruned", clock, dialect="5")
    setup.router.nodes["a:1"] = new
    clock.advance(30.0)
    assert a.tips_method == "node_getChainTips" and a.tips_report.ok and setup.pool.finalized == 980
    assert new.requests == 2 and new.calls["node_getL2Tips"] == 2, "the round's batch, then one to detect again"
    assert len(messages(logged, "no longer answers {method} (-32601)")) == 1
    assert len(messages(logged, "reports its tips with {method} now (was {previous})")) == 1
    assert not messages(logged, "gives no finalized tip"), "the tips never stopped"
    clock.advance(30.0)
    assert new.requests == 3, "one batch per round again"
    # Downgraded again: back to node_getL2Tips the same way.
    setup.router.nodes["a:1"] = simulated("pruned", clock)
    clock.advance(30.0)
    assert a.tips_method == "node_getL2Tips" and a.tips_report.ok
    service.stopService()


def test_tips_that_stop_are_logged_once_and_shown_in_health(logged):
    clock = task.Clock()
    node = simulated("pruned", clock, dialect="5")
    setup = Setup(clock, {"a": node})
    service = setup.health()
    service.startService()
    a = setup.backends["a"]
    assert a.tips_report.ok and setup.pool.finalized == 980
    # The tips method starts failing (not -32601): the method is kept, the tips are gone.
    node.handlers["node_getChainTips"] = lambda params, state: b'{"unexpected": true}'
    clock.advance(30.0)
    clock.advance(30.0)
    assert a.healthy and a.tips is None and a.tips_method == "node_getChainTips"
    assert setup.pool.finalized is None, "no node vouches for a finalized tip"
    document = backend_document(a)
    assert document["tips"]["method"] == "node_getChainTips" and document["tips"]["ok"] is False
    assert "no readable finalized tip" in document["tips"]["error"] and document["tips"]["finalized"] is None
    assert document["healthy"] is True and document["lastError"] is None, "the existing fields are unchanged"
    stopped = messages(logged, "gives no finalized tip")
    assert len(stopped) == 1 and stopped[0]["backend"] == "http://a:1" and stopped[0]["method"] == "node_getChainTips"
    assert "no readable finalized tip" in stopped[0]["error"]
    assert len(messages(logged, "no finalized tip: {reason}")) == 1, "the pool says caching stopped, once"
    # Back: logged once, the finalized tip is known again.
    node.scenario = "pruned"
    clock.advance(30.0)
    assert a.tips_report.ok and setup.pool.finalized is not None
    assert len(messages(logged, "reports its tips with {method}")) == 2
    assert len(messages(logged, "finalized tip known again")) == 1
    service.stopService()


def test_a_node_without_any_tips_method_stays_healthy_and_says_why(logged):
    clock = task.Clock()
    setup = Setup(clock, {"old": scripted(answers({"node_isReady": True, "node_getBlockNumber": 12}))})
    service = setup.health()
    service.startService()
    clock.advance(30.0)
    old = setup.backends["old"]
    assert old.healthy and old.tips is None and old.tips_method is None
    assert old.tips_report == TipsReport(None, False, "no tips method: node_getL2Tips, node_getChainTips, "
                                                      "aztec_getChainTips, aztec_getL2Tips all answered -32601 "
                                                      "(method not found)")
    assert backend_document(old)["tips"]["method"] is None
    assert len(messages(logged, "gives no finalized tip")) == 1
    service.stopService()


# ------------------------------------------------------------------------------ cross-node agreement


def test_a_diverged_node_is_quarantined_by_the_health_round(logged):
    clock = task.Clock()
    nodes = {"a": simulated("pruned", clock), "b": simulated("pruned", clock, dialect="5"),
             "c": forked(simulated("pruned", clock))}
    setup = Setup(clock, nodes)
    service = setup.health()
    service.startService()
    a, b, c = setup.pool.backends
    assert set(c.quarantine) == {"diverged"} and c.routing == "quarantined"
    assert c.divergence.height == 990 and c.divergence.source == "proven tip"
    assert c.divergence.majority == a.tips["proven"]["block"]["hash"] == b.tips["proven"]["block"]["hash"]
    assert setup.pool.candidates("/") == [a, b] and setup.pool.finalized == 980
    document = health_document(setup.pool, RequestTotals(), 1.0)
    assert document["backends"][2]["divergence"]["hash"] == c.tips["proven"]["block"]["hash"]
    assert document["backends"][2]["quarantine"]["diverged"].startswith("proven tip block 990: hash 0x")
    assert document["agreement"]["diverged"] == ["http://c:1"]
    warned = messages(logged, "diverged from the majority")
    assert len(warned) == 1 and warned[0]["backend"] == "http://c:1" and warned[0]["height"] == 990
    clock.advance(30.0)
    assert len(messages(logged, "diverged from the majority")) == 1, "logged once, not every round"
    service.stopService()


@pytest.mark.parametrize("dialect, call", [("4", "node_getBlockHeader"), ("5", "node_getBlockData")])
def test_nodes_at_different_heights_are_compared_by_archive_root(dialect, call):
    clock = task.Clock()
    nodes = {"a": simulated("pruned", clock, dialect), "b": simulated("lagging", clock, dialect),
             "c": forked(SimulatedNode(dataclasses.replace(SCENARIOS["pruned"], lag_blocks=3), CHAIN, clock=clock,
                                       dialect=dialect))}
    setup = Setup(clock, nodes, max_block_lag=10)
    service = setup.health()
    service.startService()
    a, b, c = setup.pool.backends
    # Finalized 980, 930 and 977: the tips compare nothing, so the next round asks every node for
    # the archive root after block 930, the lowest finalized block.
    assert not c.quarantine.get("diverged") and setup.pool.agreement.probe_height == 930
    assert not any(nodes[name].calls[call] for name in nodes), "no extra call while heights were unknown"
    clock.advance(30.0)
    assert all(nodes[name].calls[call] == 1 for name in nodes), "one archive call per node, in the round's batch"
    assert all(nodes[name].requests == 2 for name in nodes)
    assert a.archive == b.archive != c.archive and a.archive[0] == 930
    assert c.divergence.kind == "archive root" and c.divergence.height == 930
    assert c.quarantine["diverged"].startswith("archive root after block 930 0x")
    assert "lag" in b.quarantine and "diverged" not in b.quarantine, "far behind, but on the same chain"
    assert setup.pool.finalized == 930, "a and b (c has no say): the highest height both have finalized"
    service.stopService()


def test_two_nodes_that_disagree_make_nothing_final(logged):
    clock = task.Clock()
    setup = Setup(clock, {"a": simulated("pruned", clock), "b": forked(simulated("pruned", clock))})
    service = setup.health()
    service.startService()
    assert setup.pool.finalized is None and setup.pool.agreement.contested.height == 980
    assert all(not b.quarantine for b in setup.pool.backends)
    contest = health_document(setup.pool, RequestTotals(), 1.0)["agreement"]["contested"]
    assert sorted(node for side in contest["sides"] for node in side["nodes"]) == ["http://a:1", "http://b:1"]
    assert len(messages(logged, "nodes disagree and no majority decides")) == 1
    service.stopService()


def test_archive_calls_and_answers():
    assert archive_call("node_getL2Tips", 930) == ("node_getBlockHeader", [931])
    assert archive_call("node_getChainTips", 930) == ("node_getBlockData", [930])
    assert archive_call("aztec_getChainTips", 930) == ("aztec_getBlockData", [930])
    assert archive_call("aztec_getL2Tips", 930) is None
    header = {"lastArchive": {"root": "0xAB"}, "globalVariables": {"blockNumber": 931}}
    assert archive_of("node_getBlockHeader", 930, header) == (930, "0xab")
    assert archive_of("node_getBlockHeader", 929, header) is None, "a header of another block is no vote"
    data = {"archive": {"root": "0xcd"}, "header": {"globalVariables": {"blockNumber": "930"}}}
    assert archive_of("node_getBlockData", 930, data) == (930, "0xcd")
    for garbage in (None, RpcCallError("x"), {"archive": {}}, {"archive": {"root": 5}}, [], "0x1"):
        assert archive_of("node_getBlockData", 930, garbage) is None


# ------------------------------------------------------------------------------ integrity


def test_integrity_check_judges_real_stats_sent_gzipped():
    clock = task.Clock()
    recordings = {name: Recording(simulated(name, clock)) for name in ("archiver", "pruned", "missing-epochs")}
    setup = Setup(clock, recordings)
    service = setup.integrity()
    service.startService()
    archiver, pruned, missing = setup.pool.backends
    assert (archiver.verdict.status, archiver.node_type) == ("perfect", "archiver")
    assert (pruned.verdict.status, pruned.node_type) == ("perfect", "pruned")
    assert missing.verdict.status == "bad" and missing.verdict.missing_epochs
    seen = recordings["pruned"].seen[0]
    assert b"gzip" in b",".join(seen["request"].getRawHeaders(b"accept-encoding"))
    assert seen["response"].getRawHeaders(b"content-encoding") == [b"gzip"]
    service.stopService()


def test_integrity_parses_in_the_runner_not_on_the_reactor():
    handed: list[Any] = []

    def runner(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        handed.append(args)
        return defer.maybeDeferred(function, *args)

    clock = task.Clock()
    setup = Setup(clock, {"a": simulated("pruned", clock)})
    service = setup.integrity(runner)
    service.startService()
    assert isinstance(handed[0][0], bytes) and handed[0][1] is PARAMS
    assert setup.backends["a"].verdict.status == "perfect"
    service.stopService()


def test_integrity_check_survives_garbage_and_retries():
    clock = task.Clock()
    garbage = simulated("failing-garbage", clock)
    setup = Setup(clock, {"empty": scripted(lambda call: {"jsonrpc": "2.0", "id": 1, "result": {"stats": {}, "slotWindow": 0}}),
                   "garbage": garbage,
                   "weird": scripted(lambda call: {"jsonrpc": "2.0", "id": 1, "result": "garbage"})})
    service = setup.integrity()
    service.startService()
    empty, broken, weird = setup.pool.backends
    assert empty.verdict.status == "unverified" and empty.node_type == ""
    assert broken.verdict is None and weird.verdict is None
    garbage.scenario = "pruned"
    clock.advance(60.0)
    assert broken.verdict.status == "perfect"
    service.stopService()


def test_the_size_bound_counts_decoded_bytes():
    clock = task.Clock()
    setup = Setup(clock, {"a": simulated("pruned", clock)}, limit=4096)
    service = setup.integrity()
    service.startService()
    assert setup.backends["a"].verdict is None
    service.stopService()


# ------------------------------------------------------------------------------ the client itself


def test_the_check_client_provides_its_interface():
    verifyObject(ICheckClient, CheckClient.over(RequestTraversalAgent(Resource()), task.Clock()))


def error_of(deferred: defer.Deferred[Any]) -> BaseException:
    failures: list[Any] = []
    deferred.addErrback(failures.append)
    assert failures, "the call has not failed (yet)"
    return failures[0].value


def test_fetch_raises_node_errors():
    clock = task.Clock()
    setup = Setup(clock, {"small": simulated("pruned", clock), "hang": simulated("hang", clock)}, limit=100)
    small, hang = setup.pool.backends
    body = b'{"jsonrpc":"2.0","id":1,"method":"node_getValidatorsStats","params":[]}'
    too_large = error_of(defer.ensureDeferred(setup.client.fetch(small, body, TIMEOUT)))
    assert isinstance(too_large, UpstreamError) and too_large.kind == "too_large"
    late = defer.ensureDeferred(setup.client.fetch(hang, body, TIMEOUT))
    clock.advance(TIMEOUT)
    timeout = error_of(late)
    assert isinstance(timeout, UpstreamError) and timeout.kind == "timeout"


# ------------------------------------------------------------------------------ parsing helpers


@pytest.mark.parametrize("value, expected", [(0, 0), (17, 17), ("42", 42)])
def test_block_number_accepts_numbers_and_numeric_strings(value, expected):
    assert block_number_of(value) == expected


@pytest.mark.parametrize("value", [True, -1, "0x10", "", None, 1.5, [1]])
def test_block_number_refuses_the_rest(value):
    with pytest.raises(RpcCallError):
        block_number_of(value)


def test_chain_identity_sources():
    headers = Headers({b"x-aztec-l1ChainId": [b"1"], b"x-aztec-rollupVersion": [b"7"]})
    assert chain_of({"l1ChainId": 5, "rollupVersion": 3}, headers) == ("5", "3")
    assert chain_of(RpcCallError("no such method"), headers) == ("1", "7")
    assert chain_of(None, Headers()) is None
    assert protocol_contracts_of(Headers({b"x-aztec-l2ProtocolContractsHash": [b"0xABcd"]})) == "0xabcd"
    assert protocol_contracts_of(Headers({b"x-aztec-l2ProtocolContractsHash": [b" "]})) is None
    assert protocol_contracts_of(headers) is None
    assert oldest_block_of({"oldestHistoricBlockNumber": 12}) == 12
    assert oldest_block_of({"oldestHistoricBlockNumber": True}) is None
    assert oldest_block_of(RpcCallError("x")) is None
