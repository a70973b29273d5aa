"""The operator dashboard, rendered by a real headless chromium against ``twistd sentinel-proxy --demo``.

Chromium runs the page's JavaScript under a virtual-time budget (its 2 s refresh loop runs a few
times in well under a second of real time) and dumps the resulting DOM, which is parsed with the
standard library. No browser-driver package is needed: only a ``chromium`` binary (Debian package
``chromium``). Without one, the browser tests skip; CI installs it.

To refresh the screenshot in the docs: ``SENTINEL_UPDATE_DASHBOARD_PNG=1 .venv/bin/pytest tests/test_dashboard.py``.
"""
from __future__ import annotations

import json
import os
import re
import struct
import time
import zlib

import pytest

from tests.processes import ROOT, Daemon, fetch, poll
from tests.browser_support import CHROMIUM, Element, needs_chromium, parse, run_chromium

STATIC = ROOT / "sentinel_proxy" / "web" / "static"
DOCS_PNG = ROOT / "docs" / "dashboard.png"
VERDICTS = {"VALID", "WARNING", "PARTIAL", "INVALID", "missing", "skipped", "inconsistent", "unknown"}
ROW_FIELDS = {"health", "routing", "type", "block", "lag", "score", "status", "latency", "requests", "errors", "epochs"}


if CHROMIUM is None and os.environ.get("CI"):
    # CI installs chromium (.ci/run): there a missing browser is a broken setup, not a reason to skip.
    raise RuntimeError("CI=true but no chromium binary on PATH: the dashboard browser test cannot run")


# ---------- a tiny DOM over html.parser ----------


# ---------- chromium ----------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png_pixels(data: bytes) -> bytes:
    """The decompressed (still filtered) image data: enough to tell a blank page from a drawn one."""
    chunks, offset = [], 8
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8]
        if kind == b"IDAT":
            chunks.append(data[offset + 8:offset + 8 + length])
        offset += 12 + length
    return zlib.decompress(b"".join(chunks))


# ---------- the demo ----------

@pytest.fixture
def demo(tmp_path):
    """``twistd sentinel-proxy --demo`` on a free port, settled: 4 healthy, classified nodes."""
    daemon = Daemon(["sentinel-proxy", "--demo", "--listen", "tcp:0:interface=127.0.0.1"], tmp_path)
    try:
        port = daemon.wait_for_line(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)").group(1)
        base = f"http://127.0.0.1:{port}"

        def settled():
            status, body = fetch(base + "/health")
            if status != 200:
                return None
            health = json.loads(body)
            backends = health.get("backends", [])
            ready = (len(backends) == 4 and all(b["healthy"] and b["nodeType"] for b in backends)
                     and any(b["integrityStats"]["integrityStatus"] == "bad" for b in backends)
                     and any(b.get("routing") == "quarantined" for b in backends))
            return health if ready else None

        assert poll(settled, timeout=30), "the demo fleet did not settle in time:\n" + "".join(daemon.lines)
        yield base
    finally:
        daemon.stop()


def health_of(base: str) -> dict:
    status, body = fetch(base + "/health")
    assert status == 200
    return json.loads(body)


def by_url(health: dict) -> dict[str, dict]:
    return {b["url"]: b for b in health["backends"]}


def send_some_traffic(base: str, calls: int) -> None:
    for i in range(calls):
        status, _ = fetch(base + "/", json.dumps(
            {"jsonrpc": "2.0", "id": i, "method": "node_getBlockNumber", "params": []}).encode())
        assert status == 200


# ---------- tests ----------

def test_page_is_self_contained_and_builds_no_html_from_data():
    """Closed networks: no CDN or remote font; assets and the health URL are relative (path prefixes)."""
    html = (STATIC / "dashboard.html").read_text()
    script = (STATIC / "dashboard.js").read_text()
    css = (STATIC / "dashboard.css").read_text()
    page = parse(html)
    assert [e.attrs["src"] for e in page.find_all(src=None)] == ["static/dashboard.js"]
    assert [e.attrs["href"] for e in page.find_all(rel="stylesheet")] == ["static/dashboard.css"]
    for text in (html, script.replace('"http://www.w3.org/2000/svg"', '""'), css):  # a name, never fetched
        assert not re.search(r"https?://|@import|url\(\s*['\"]?(?!data:)", text)
    assert re.search(r"""HEALTH_URL\s*=\s*["']health["']""", script)
    assert not re.search(r"\.(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML|document\.write|\beval\(", script)


@needs_chromium
@pytest.mark.slow
def test_dashboard_shows_the_demo_fleet(demo, tmp_path):
    send_some_traffic(demo, 7)
    before = health_of(demo)
    dom = run_chromium(["--dump-dom", demo + "/dashboard"], tmp_path / "profile-dom").stdout
    after = health_of(demo)
    page = parse(dom)

    body = page.one(data_state=None)
    assert body.tag == "body" and body.attrs["data-state"] == "live", dom[-2000:]

    rows = page.find_all(data_node=None)
    assert sorted(r.attrs["data-node"] for r in rows) == sorted(by_url(after)), "one row per backend"
    assert len(rows) == 4

    for row in rows:
        url = row.attrs["data-node"]
        old, new = by_url(before)[url], by_url(after)[url]
        cells = row.fields()
        assert ROW_FIELDS <= set(cells), f"{url}: missing fields {ROW_FIELDS - set(cells)}"
        # The page fetched /health between the two snapshots, and blocks only go up.
        block = int(cells["block"].text())
        assert old["blockNumber"] - 1 <= block <= new["blockNumber"] + 1, (url, block, old["blockNumber"],
                                                                            new["blockNumber"])
        assert cells["health"].text() == "healthy"
        assert cells["type"].text() == new["nodeType"]
        assert cells["routing"].text() in {old["routing"], new["routing"]}
        assert cells["status"].text() in {old["integrityStats"]["integrityStatus"],
                                          new["integrityStats"]["integrityStatus"]}
        assert "ms" in cells["latency"].text()
        requests = int(cells["requests"].text().replace(",", ""))
        assert old["requestStats"]["totalRequests"] <= requests <= new["requestStats"]["totalRequests"]
        errors = int(cells["errors"].text().replace(",", ""))
        assert old["requestStats"]["totalErrors"] <= errors <= new["requestStats"]["totalErrors"]

        strip = cells["epochs"]
        epochs = [c for c in strip.children if isinstance(c, Element)]
        assert epochs, f"{url}: empty epoch strip"
        numbers = [int(c.attrs["data-epoch"]) for c in epochs]
        assert numbers == sorted(set(numbers)), f"{url}: epochs not ascending and unique: {numbers}"
        assert {c.attrs["data-verdict"] for c in epochs} <= VERDICTS
        assert all(c.attrs.get("title", "").startswith(f"epoch {n} ") for c, n in zip(epochs, numbers))
        # The strip and the "bad epochs" column agree with each other.
        missing_cells = {c.attrs["data-epoch"] for c in epochs if c.attrs["data-verdict"] == "missing"}
        assert missing_cells == set(re.findall(r"\d+", cells["missing"].attrs.get("title", ""))), url

    # The node with holes in its history.
    holed = [u for u, b in by_url(after).items() if b["integrityStats"]["missingEpochs"]]
    assert len(holed) == 1
    row = page.one(data_node=holed[0])
    cells = row.fields()
    assert cells["status"].text() == "bad"
    assert int(cells["score"].text()) <= 95
    missing = [c for c in cells["epochs"].children
               if isinstance(c, Element) and c.attrs["data-verdict"] == "missing"]
    assert missing, "the missing-epochs node shows no missing epoch cell"
    known = {str(e) for h in (before, after) for e in by_url(h)[holed[0]]["integrityStats"]["missingEpochs"]}
    assert {c.attrs["data-epoch"] for c in missing} <= known
    assert any(c.attrs["data-verdict"] == "WARNING" for c in cells["epochs"].children if isinstance(c, Element))

    # The node that lags behind.
    lagging = [u for u, b in by_url(after).items() if "lag" in (b.get("quarantine") or {})]
    assert len(lagging) == 1
    cells = page.one(data_node=lagging[0]).fields()
    assert cells["routing"].text() == "quarantined"
    assert int(cells["lag"].text()) > 10
    assert "behind" in cells["quarantine"].text()

    # Totals.
    totals = page.one(id="totals").fields()
    assert totals["total-nodes"].text() == "4"
    assert totals["healthy-nodes"].text() == "4"
    assert int(totals["total-requests"].text().replace(",", "")) >= 7
    assert totals["overall-status"].text() == "healthy"
    assert sum(int(totals[f"routing-{s}"].text()) for s in ("preferred", "fallback", "quarantined", "down")) == 4
    assert int(totals["best-block"].text()) == max(int(r.fields()["block"].text()) for r in rows)


@needs_chromium
@pytest.mark.slow
def test_dashboard_screenshot(demo, tmp_path):
    send_some_traffic(demo, 12)
    fetch(demo + "/", b'{"jsonrpc":"2.0","id":1,"method":"nodeAdmin_getConfig","params":[]}')  # one refusal
    shot = tmp_path / "dashboard.png"
    run_chromium([f"--screenshot={shot}", "--window-size=1366,900", demo + "/dashboard"], tmp_path / "profile-png")
    data = shot.read_bytes()
    assert png_size(data) == (1366, 900)
    assert len(data) > 20_000, "suspiciously small screenshot"
    assert len(set(png_pixels(data))) > 64, "the screenshot looks blank"

    if os.environ.get("SENTINEL_UPDATE_DASHBOARD_PNG"):
        # The docs' copy: after three history samples (10 s apart) of traffic, and with one refresh
        # only, so that the browser's virtual clock does not run ahead of the gateway's.
        for _ in range(30):
            send_some_traffic(demo, 5)
            time.sleep(1)
        run_chromium([f"--screenshot={DOCS_PNG}", "--window-size=1366,1300", demo + "/dashboard"],
                     tmp_path / "profile-docs", budget_ms=1000)
        assert png_size(DOCS_PNG.read_bytes()) == (1366, 1300)
