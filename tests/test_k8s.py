"""The Kubernetes manifests of deploy/k8s/, checked offline (CI has no cluster).

- every object passes the Kubernetes JSON schemas, strictly (an unknown or misspelt field fails),
  of the oldest version the runbook names and of the newest one the validator bundles
  (``kubernetes-validate`` from PyPI: its schemas ship in the wheel, no network);
- the objects point at each other: Service, PodDisruptionBudget, HorizontalPodAutoscaler and
  NetworkPolicy select the pods they mean and no others, ports and names agree;
- what the gateway needs holds: every variable is a setting, the settings load, the secrets'
  placeholders cannot go live, the probes' paths answer as the manifest's comments say, and the
  grace period covers DRAIN_DELAY_MS + SHUTDOWN_GRACE_MS.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from sentinel_proxy.config import SPECS, load_settings
from sentinel_proxy.settings import MAX_WORKERS, SECRET_SETTINGS, SPECS_BY_FIELD
from sentinel_proxy.stores.cache_address import parse_redis_url
from tests.support import http
from tests.deploy_support import DOCKERFILE, instructions, runbook_anchor, yaml_module

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
#: The oldest Kubernetes the manifests are checked against (docs/runbook.md, "Kubernetes").
OLDEST = "1.29"
#: What CI installs for these checks (setup.py's test extra); named in the failure message.
VALIDATE_INSTALL = "pip install kubernetes-validate"
#: Time a stopping gateway needs after SHUTDOWN_GRACE_MS: its last writes (at least 0.5 s), the
#: checks and stores stopping, the workers' exit.
STOP_MARGIN = 2.0
ENV_NAMES = {spec.env for spec in SPECS}
ensure = pytest_twisted.ensureDeferred


def validator():
    try:
        import kubernetes_validate
    except ImportError:  # a failure, not a skip: these checks must run on CI
        pytest.fail(f"kubernetes-validate checks the manifests against the Kubernetes schemas: {VALIDATE_INSTALL}")
    return kubernetes_validate


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[dict[str, Any]]:
    yaml = yaml_module()
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def the(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s/, found {len(found)}"
    return found[0]


def gateway() -> dict[str, Any]:
    return the("Deployment", "sentinel-proxy")


def container() -> dict[str, Any]:
    (only,) = gateway()["spec"]["template"]["spec"]["containers"]
    return only


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def pod_labels(name: str) -> dict[str, str]:
    return the("Deployment", name)["spec"]["template"]["metadata"]["labels"]


def config() -> dict[str, str]:
    return the("ConfigMap", "sentinel-proxy")["data"]


def secrets() -> dict[str, str]:
    return the("Secret", "sentinel-proxy")["stringData"]


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def workers_env() -> dict[str, str]:
    """WORKERS as the kubelet resolves it: the referenced resource, rounded up (divisor 1)."""
    (entry,) = [e for e in container()["env"] if e["name"] == "WORKERS"]
    reference = entry["valueFrom"]["resourceFieldRef"]
    assert reference["containerName"] == container()["name"] and reference["divisor"] == "1"
    kind, resource = reference["resource"].split(".")
    return {"WORKERS": str(math.ceil(cpu_cores(container()["resources"][kind][resource])))}


def environment(secret_values: dict[str, str]) -> dict[str, str]:
    """The gateway container's environment: the ConfigMap, the Secret, then its own ``env``."""
    return {**config(), **secret_values, **workers_env()}


def seconds(setting: str) -> float:
    spec = SPECS_BY_FIELD[setting]
    return spec.parse(config().get(spec.env, spec.default)) / 1000.0


# --- the schemas ------------------------------------------------------------------------------

def test_the_kustomization_lists_every_manifest():
    listed = yaml_module().safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in manifest_files()]
    kinds = {o["kind"] for o in objects()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap",
            "Secret"} <= kinds


@pytest.mark.parametrize("version", [OLDEST, "newest"])
def test_every_manifest_passes_the_kubernetes_schemas(version):
    kv = validator()
    version = kv.latest_version() if version == "newest" else version
    for obj in objects():
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} against Kubernetes {version}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_schemas_catch_a_misspelt_field_and_a_wrong_type():
    kv = validator()
    misspelt = gateway()
    probe = misspelt["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    with pytest.raises(kv.ValidationError):
        kv.validate(misspelt, OLDEST, strict=True)
    wrong_type = gateway()
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, OLDEST, strict=True)


# --- the objects point at each other ------------------------------------------------------------

def test_selectors_pick_the_gateway_pods_and_nothing_else():
    deployment = gateway()
    labels, redis = pod_labels("sentinel-proxy"), pod_labels("sentinel-proxy-redis")
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = the("Service", "sentinel-proxy")["spec"]["selector"]
    budget = the("PodDisruptionBudget", "sentinel-proxy")["spec"]["selector"]["matchLabels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    for selector in (service, budget, spread):
        assert selects(selector, labels) and not selects(selector, redis)
    target = the("HorizontalPodAutoscaler", "sentinel-proxy")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "sentinel-proxy")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_redis_is_reached_by_the_gateways_only_through_its_service():
    labels, redis = pod_labels("sentinel-proxy"), pod_labels("sentinel-proxy-redis")
    service = the("Service", "sentinel-proxy-redis")
    assert selects(service["spec"]["selector"], redis) and not selects(service["spec"]["selector"], labels)
    policy = the("NetworkPolicy", "sentinel-proxy-redis")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], redis)
    (rule,) = policy["ingress"]
    assert [selects(peer["podSelector"]["matchLabels"], labels) for peer in rule["from"]] == [True]
    (redis_container,) = the("Deployment", "sentinel-proxy-redis")["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in port_names and rule["ports"][0]["port"] in port_names
    for variable in ("SHARED_STATE", "CACHE", "RATE_LIMIT"):
        address = parse_redis_url(config()[variable])
        assert (address.host, address.port) == (service["metadata"]["name"], port["port"]), variable
    assert parse_redis_url(config()["SHARED_STATE"]).db != parse_redis_url(config()["CACHE"]).db


def test_the_ports_agree_with_the_gateways_listen_port():
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert named == {"http": int(config()["PROXY_PORT"])}
    assert "PROXY_LISTEN" not in config()
    (port,) = the("Service", "sentinel-proxy")["spec"]["ports"]
    assert port["targetPort"] in named
    for probe in ("readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["port"] in named


# --- what the gateway needs ---------------------------------------------------------------------

def test_every_variable_is_a_setting_and_every_secret_is_in_the_secret():
    names = set(config()) | set(secrets()) | {e["name"] for e in container()["env"]}
    assert names <= ENV_NAMES, f"not settings: {sorted(names - ENV_NAMES)}"
    secret_envs = {SPECS_BY_FIELD[f].env for f in SECRET_SETTINGS}
    assert set(secrets()) <= secret_envs and not set(config()) & secret_envs
    sources = container()["envFrom"]
    assert {s.get("configMapRef", s.get("secretRef", {})).get("name") for s in sources} == {"sentinel-proxy"}


def test_the_placeholders_in_the_secret_cannot_go_live():
    by_env = {spec.env: spec for spec in SPECS}
    for name, value in secrets().items():
        if value:
            with pytest.raises(ValueError):
                by_env[name].parse(value)


def test_the_settings_load_as_the_pod_would_start():
    real = {name: ("k" * 32 if value else "") for name, value in secrets().items()}
    settings = load_settings(environ=environment(real), dotenv_path=None)
    assert 1 < settings.workers <= MAX_WORKERS
    assert settings.shared_state and settings.cache.startswith("redis://")
    assert not settings.protect_status, "the liveness probe reads /health without a token"


def test_one_worker_per_requested_core_with_requests_equal_to_limits():
    resources = container()["resources"]
    assert resources["requests"] == resources["limits"]
    cores = cpu_cores(resources["requests"]["cpu"])
    assert cores == int(cores) and int(workers_env()["WORKERS"]) == cores
    assert "WORKERS" not in config()


def test_the_grace_period_covers_the_gateways_drain():
    spec = gateway()["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    # No preStop hook: DRAIN_DELAY_MS is that hook, and it turns /ready 503 at once, which a
    # sleep before SIGTERM would delay. One added here would add its length to the sum.
    assert "lifecycle" not in container()
    needed = seconds("drain_delay_ms") + seconds("shutdown_grace_ms") + STOP_MARGIN
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < {needed}"
    liveness = container()["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "liveness would fire during a drain"


def test_the_pod_runs_as_the_images_user_on_a_read_only_root():
    user = next(args for name, args in instructions(DOCKERFILE) if name == "USER")
    spec = gateway()["spec"]["template"]["spec"]
    assert f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == user
    assert spec["securityContext"]["runAsNonRoot"] and container()["securityContext"]["readOnlyRootFilesystem"]
    assert spec["enableServiceLinks"] is False, "Service links inject *_PORT variables next to our settings"
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    assert mounts == {"tmp": "/tmp"}, "the --workers metrics directory is made under $TMPDIR"
    assert {v["name"] for v in spec["volumes"]} == {"tmp"}
    compose = yaml_module().safe_load(COMPOSE.read_text())
    assert container()["image"] == compose["services"]["gateway"]["image"]


@ensure
async def test_the_probe_paths_answer_as_the_manifest_says():
    """Liveness 200 with every node down and while draining; readiness 503 in both."""
    from twisted.internet import reactor, task
    from twisted.web.server import Site

    from sentinel_proxy.ops.admin import Admin
    from sentinel_proxy.ops.metrics import Metrics
    from sentinel_proxy.state.backends import BackendPool
    from sentinel_proxy.state.status import RequestTotals
    from sentinel_proxy.web.app import GatewayApp  # imports Klein: late, as tests/test_ready.py does
    from sentinel_proxy.web.auth import Access

    live, ready = (container()[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe"))
    real = {name: ("k" * 32 if value else "") for name, value in secrets().items()}
    settings = load_settings(environ=environment(real), dotenv_path=None)
    pool = BackendPool([url for _, url in settings.backends])  # never checked: every node down
    draining = [False]
    app = GatewayApp(pool, Metrics(pool), RequestTotals(), task.Clock(),
                     Admin(pool, (), lambda: settings, lambda: 0), Access(lambda: settings),
                     draining=lambda: draining[0])
    port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        for state in (False, True):
            draining[0] = state
            assert (await http("GET", base + live)).code == 200
            assert (await http("GET", base + ready)).code == 503
    finally:
        await port.stopListening()


# --- the docs -----------------------------------------------------------------------------------

def test_the_scaling_page_and_the_runbook_section_link_to_what_exists():
    """docs/scaling.md and the runbook's Kubernetes section: every relative link names a file that
    exists and, with ``#anchor``, one of its headings."""
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    section = runbook[runbook.index("### Kubernetes"):]
    section = section[:section.index("\n### ", 1)]
    pages = [(ROOT / "docs" / "scaling.md").read_text(), section]
    links = [link for page in pages for link in re.findall(r"\]\(([^)#][^)]*|#[^)]+)\)", page)]
    assert any("deploy/k8s" in link for link in links)
    for link in links:
        target, _, anchor = link.partition("#")
        path = (ROOT / "docs" / target).resolve() if target else ROOT / "docs" / "scaling.md"
        assert path.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            assert anchor in {runbook_anchor(h) for h in headings}, link
