"""deploy/grafana: the dashboard is a valid Grafana dashboard, every metric its PromQL asks for is in
a real gateway's /metrics after some traffic, and docker-compose.yml provisions it from files that
exist (docs/grafana.md)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.support import http, post_json, rpc

ensure = pytest_twisted.ensureDeferred

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sentinel-proxy.json"
COMPOSE = ROOT / "docker-compose.yml"

#: PromQL words that are not metric names when not followed by "(": operators and modifiers.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "inf", "nan"}
#: Modifiers whose parenthesised list holds label names, not metrics.
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
WORDS = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: words that are not functions, aggregations,
    keywords, label names (in matchers and in by/on/... lists), strings, durations or Grafana variables."""
    text = STRINGS.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)    # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries ([5m], [$__rate_interval])
    text = LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)   # Grafana variables elsewhere
    names = set()
    for match in WORDS.finditer(text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an aggregation, or an operator
        names.add(word)
    return names


def test_metric_names_are_read_from_promql():
    assert metric_names('histogram_quantile(0.99, sum by (backend, le) (rate(x_bucket{instance=~"$instance",'
                        'le!="1"}[$__rate_interval])))') == {"x_bucket"}
    assert metric_names("sum by (instance) (a{b=\"c d(e)\"}) >= 0.9 * on (instance) group_left sum(m_total)"
                        " and on (instance, job) c_total offset 5m > bool 1e3") == {"a", "m_total", "c_total"}
    assert metric_names("max without (pid) (up) or vector(0)") == {"up"}
    assert metric_names("time() - last_ts > 3 * interval_s") == {"last_ts", "interval_s"}
    assert metric_names("rate(process_cpu_seconds_total{instance=~\"${instance}\"}[5m:1m])") == {
        "process_cpu_seconds_total"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return found


def expressions(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, the template variables' included."""
    found = [(panel["title"], target["expr"]) for panel in graph_panels(board) for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found.append((f"${variable['name']}", re.fullmatch(r"label_values\((\w+),\s*\w+\)", query).group(1)))
    return found


def test_the_dashboard_is_a_grafana_dashboard():
    board = dashboard()
    assert board["uid"] == "sentinel-proxy" and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["includeAll"]
    panels = graph_panels(board)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    wanted = ["requests by route and outcome", "node traffic latency p50 / p99", "per-method latency",
              "cache hit ratio", "upstream calls saved", "node health", "lag", "integrity score",
              "routing over time", "breaker states", "rate-limited and overloaded answers"]
    titles = [panel["title"].lower() for panel in panels]
    for title in wanted:
        assert any(t.startswith(title) for t in titles), f"no panel {title!r}"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["refId"]
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: not filtered by $instance"


def scrape_families(text: str) -> tuple[set[str], dict[str, str]]:
    """(every sample name, family name -> type) of a text scrape."""
    samples, types = set(), {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.update(sample.name for sample in family.samples)
    return samples, types


def family_of(name: str, types: dict[str, str]) -> tuple[str, str]:
    """(family, type) a sample name belongs to: a histogram's _bucket/_sum/_count, a counter's
    _total, or a family of its own name."""
    for suffix, kinds in (("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                          ("_count", ("histogram", "summary")), ("_total", ("counter",))):
        base = name.removesuffix(suffix)
        if base != name and types.get(base) in kinds:
            return base, types[base]
    return name, types.get(name, "")


@pytest.mark.slow
@ensure
async def test_every_metric_the_dashboard_queries_is_in_a_gateways_scrape(cluster):
    node = cluster.node("pruned")
    _, gateway = await cluster.gateway([node], cache="memory", rate_limit="memory")
    await post_json(gateway, rpc("node_getBlockNumber"))
    await post_json(gateway, [rpc("node_getBlock", [1], id_=0), rpc("node_getL2Tips", id_=1)])
    for _ in range(2):  # the second is a cache hit
        await post_json(gateway, rpc("node_getBlockHeader", [1]))
    await post_json(gateway + "/archiver", rpc("node_getBlockNumber"))  # no archiver: 503
    answer = await http("GET", gateway + "/metrics")
    assert answer.code == 200
    samples, types = scrape_families(answer.body.decode())

    queried = {(title, name) for title, expr in expressions(dashboard()) for name in metric_names(expr)}
    assert len({name for _, name in queried}) >= 15
    missing = sorted((title, name) for title, name in queried if name not in samples)
    assert not missing, f"the dashboard queries metrics the gateway does not export: {missing}"
    for title, name in queried:
        family, kind = family_of(name, types)
        if name.endswith("_bucket"):
            assert kind == "histogram", f"{title}: {name} is not a histogram's bucket"
        if name.endswith("_total"):
            assert kind == "counter", f"{title}: {name} is not a counter"
    # Every histogram_quantile reads buckets, and every rate() or increase() a counter or histogram.
    for title, expr in expressions(dashboard()):
        for argument in re.findall(r"histogram_quantile\([^,]+,.*?\b(\w+)\{", expr):
            assert argument.endswith("_bucket"), f"{title}: histogram_quantile over {argument}"
        for argument in re.findall(r"\b(?:rate|increase)\((\w+)", expr):
            assert family_of(argument, types)[1] in ("counter", "histogram"), f"{title}: rate of {argument}"


def compose_mounts(service: dict) -> dict[str, Path]:
    """target -> source path of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        if source.startswith("."):
            mounts[target] = ROOT / source
    return mounts


def container_path(mounts: dict[str, Path], target: str) -> Path:
    """Where a path inside the container comes from on this side of the mounts."""
    for mounted, source in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if target == mounted or target.startswith(mounted + "/"):
            return source / target[len(mounted):].lstrip("/")
    raise AssertionError(f"{target} is not mounted")


def test_compose_provisions_grafana_from_files_that_exist():
    yaml = pytest.importorskip("yaml", reason="pip install pyyaml")
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    mounts = compose_mounts(grafana)
    for source in mounts.values():
        assert source.exists(), f"grafana mounts {source}, which does not exist"

    datasources = container_path(mounts, "/etc/grafana/provisioning/datasources")
    sources = [s for f in sorted(datasources.glob("*.yml")) for s in yaml.safe_load(f.read_text())["datasources"]]
    assert [s["type"] for s in sources] == ["prometheus"] and sources[0]["isDefault"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", sources[0]["url"]).groups()
    assert host in services and any(p.split(":")[-1] == port for p in services[host]["ports"])

    providers = container_path(mounts, "/etc/grafana/provisioning/dashboards")
    paths = [p["options"]["path"] for f in sorted(providers.glob("*.yml"))
             for p in yaml.safe_load(f.read_text())["providers"]]
    assert paths, "no dashboard provider"
    boards = [board for path in paths for board in container_path(mounts, path).glob("*.json")]
    assert DASHBOARD in boards
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_path(mounts, home) == DASHBOARD
