"""The dashboard's history in a real headless chromium, against an in-process gateway whose nodes the
test controls: the charts are drawn from samples of real traffic, and a quarantine the test
provokes (a node falling 50 blocks behind) is on the timeline and in the node's one-line reason.

Chromium runs in a thread (``deferToThread``) so that the reactor keeps serving the page meanwhile;
see tests/test_dashboard.py for how it is driven.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import threads

from sentinel_simnode.node import SCENARIOS
from tests.support import JSON, http, post_json, rpc, wait_for
from tests.browser_support import Element, needs_chromium, parse, run_chromium

ensure = pytest_twisted.ensureDeferred


def chart(box: Element, kind: str) -> Element:
    return box.one(data_chart=kind)


def drawn(svg: Element, tag: str) -> list[Element]:
    return [e for e in svg.elements() if e.tag == tag]


@needs_chromium
@pytest.mark.slow
@ensure
async def test_charts_render_with_data_and_the_timeline_shows_a_provoked_quarantine(cluster, tmp_path):
    nodes = [cluster.node("pruned") for _ in range(3)]
    service, url = await cluster.gateway(nodes)
    history = service.history.history
    for round_ in range(3):  # three samples, each after some real traffic (and one taken at start)
        for i in range(12):
            assert (await post_json(url, [rpc("node_getBlockNumber", id_=i)])).code == 200
        history.sample()
    assert (await http("POST", url + "/", b"{oops", JSON)).code == 400  # a caller's error, not a node's
    laggard = nodes[2]
    backend = next(b for b in service.pool.backends if b.url == laggard.url)
    laggard.node.scenario = SCENARIOS["lagging"]  # 50 blocks behind the others
    await wait_for(lambda: "lag" in backend.quarantine, what="the lagging node to be quarantined")
    history.sample()

    dom = (await threads.deferToThread(run_chromium, ["--dump-dom", url + "/dashboard"], tmp_path / "profile")).stdout
    page = parse(dom)
    assert page.one(data_state=None).attrs["data-state"] == "live", dom[-2000:]

    boxes = {box.attrs["data-history-node"]: box for box in page.find_all(data_history_node=None)}
    assert set(boxes) == {n.url for n in nodes}
    for name, box in boxes.items():
        height = chart(box, "height")
        assert height.attrs["data-points"] == "5" and drawn(height, "polyline"), name
        routing = chart(box, "routing")
        assert len(drawn(routing, "rect")) == 5, name
    latencies = [chart(box, "latency") for box in boxes.values()]
    assert any(int(c.attrs["data-points"]) >= 2 and drawn(c, "polyline") for c in latencies), "real traffic's latency"
    lagging = boxes[laggard.url]
    assert drawn(chart(lagging, "routing"), "rect")[-1].attrs["class"] == "state quarantined"
    assert [e.text() for e in drawn(chart(lagging, "lag"), "title")] == ["lag: from 0 to 50 blocks"]
    note = lagging.one(data_field="note").text()
    assert note.startswith("no traffic: quarantined: 50 blocks behind") and "(since " in note

    events = [li for li in page.one(id="timeline").elements() if li.tag == "li"]
    quarantined = [li.text() for li in events if li.attrs.get("data-kind") == "quarantined"]
    assert len(quarantined) == 1 and f"{laggard.url} quarantined: 50 blocks behind" in quarantined[0]

    totals = page.one(id="totals").fields()
    assert totals["caller-errors"].text() == "1" and totals["node-errors"].text() == "0"
