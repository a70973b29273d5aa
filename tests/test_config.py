"""Settings: prototype names and defaults, precedence, and refusals that name the bad value."""
import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from sentinel_proxy.config import SPECS, ConfigError, load_settings, read_dotenv

BACKENDS = {"SENTINEL_BACKENDS": "http://a:8080,http://b:8080"}


def load(cli=None, env=None, dotenv=None, demo=False):
    return load_settings(cli=cli or {}, environ={**BACKENDS, **(env or {})}, dotenv_path=dotenv, demo=demo)


def test_prototype_defaults():
    s = load()
    assert (s.port, s.log_level, s.request_timeout_ms, s.health_check_interval_ms) == (8080, "info", 30000, 30000)
    assert (s.integrity_check_interval_ms, s.integrity_check_epochs, s.integrity_score_threshold) == (60000, 10, 95)
    assert (s.slots_per_epoch, s.expected_validators, s.archiver_threshold_epochs) == (32, 24, 100)
    assert s.backends == (("", "http://a:8080"), ("", "http://b:8080"))
    assert s.listen == ("tcp:8080",)
    assert (s.max_batch_size, s.max_body_bytes) == (100, 1048576)


def test_option_names_follow_the_variables():
    options = {spec.env: spec.option for spec in SPECS}
    assert options["SENTINEL_BACKENDS"] == "backends"
    assert options["PROXY_PORT"] == "port"
    assert options["LOG_LEVEL"] == "log-level"
    assert options["REQUEST_TIMEOUT_MS"] == "request-timeout-ms"
    assert options["HEALTH_CHECK_INTERVAL_MS"] == "health-check-interval-ms"
    assert options["PROXY_LISTEN"] == "listen"


def test_precedence_option_over_environment_over_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PROXY_PORT=7000\nLOG_LEVEL=debug\nREQUEST_TIMEOUT_MS=5\n")
    s = load(cli={"port": "9000"}, env={"PROXY_PORT": "8000", "LOG_LEVEL": "warn"}, dotenv=str(dotenv))
    assert (s.port, s.log_level, s.request_timeout_ms) == (9000, "warn", 5)
    assert s.listen == ("tcp:9000",)


def test_listen_endpoint_wins_over_port():
    assert load(cli={"listen": "tcp:0:interface=127.0.0.1", "port": "1"}).listen == ("tcp:0:interface=127.0.0.1",)


@pytest.mark.parametrize("env, fragment", [
    ({"REQUEST_TIMEOUT_MS": "abc"}, "REQUEST_TIMEOUT_MS (environment): 'abc' is not a whole number"),
    ({"HEALTH_CHECK_INTERVAL_MS": "-5"}, "HEALTH_CHECK_INTERVAL_MS (environment): '-5' is below the minimum"),
    ({"PROXY_PORT": "70000"}, "PROXY_PORT (environment): '70000' is above the maximum"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL (environment): 'loud' is not one of"),
    ({"SENTINEL_BACKENDS": "ftp://x"}, "SENTINEL_BACKENDS (environment): 'ftp://x' is not an http"),
    ({"SENTINEL_BACKENDS": "http://:80"}, "has no host"),
    ({"SENTINEL_BACKENDS": "http://a:notaport"}, "is not a valid URL"),
    ({"SENTINEL_BACKENDS": "http://a:1,http://a:1"}, "is listed twice"),
    ({"SENTINEL_BACKENDS": " , "}, "no backend URL given"),
    ({"SENTINEL_BACKENDS": "bad name=http://a:1"}, "'bad name' is not a node name"),
    ({"SENTINEL_BACKENDS": "n=http://a:1,n=http://b:1"}, "node name 'n' is used twice"),
    ({"SENTINEL_BACKENDS": "http://nodé:1"}, "is not ASCII"),
    ({"INTEGRITY_SCORE_THRESHOLD": "101"}, "INTEGRITY_SCORE_THRESHOLD"),
])
def test_bad_values_are_refused_with_name_and_value(env, fragment):
    with pytest.raises(ConfigError) as caught:
        load(env=env)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_option_names_the_option():
    with pytest.raises(ConfigError, match=r"--request-timeout-ms: 'x'"):
        load(cli={"request_timeout_ms": "x"})


def test_missing_backends_is_refused():
    with pytest.raises(ConfigError, match="SENTINEL_BACKENDS is not set"):
        load_settings(cli={}, environ={}, dotenv_path=None)


def test_demo_needs_no_backends_and_uses_a_devnet_chain():
    s = load_settings(cli={}, environ={}, dotenv_path=None, demo=True)
    assert s.backends == () and s.demo
    assert (s.slots_per_epoch, s.expected_validators) == (8, 8)
    assert load_settings(cli={"slots_per_epoch": "32"}, environ={}, dotenv_path=None, demo=True).slots_per_epoch == 32


@pytest.mark.parametrize("line, key, value", [
    ('LOG_LEVEL="debug" # x', "LOG_LEVEL", "debug"),
    ('B="x\\"y"', "B", 'x"y'),
    ("C='single # not a comment'", "C", "single # not a comment"),
    ("export D=plain # trailing", "D", "plain"),
    ("E=a#b", "E", "a#b"),
    ("F=", "F", ""),
    ('G="two\\nlines"', "G", "two\nlines"),
    ("H=pa$$word${HOME}", "H", "pa$$word${HOME}"),
    ("I = spaced ", "I", "spaced"),
])
def test_dotenv_quotes_escapes_and_comments(tmp_path, line, key, value):
    path = tmp_path / ".env"
    path.write_text(f"# comment\n\n{line}\n")
    assert read_dotenv(str(path)) == {key: value}


def test_dotenv_values_reach_the_settings(tmp_path):
    path = tmp_path / ".env"
    path.write_text('LOG_LEVEL="debug" # quieter later\nADMIN_TOKEN=\'a$token-with-#-in-it\'\n')
    settings = load(dotenv=str(path))
    assert (settings.log_level, settings.admin_token) == ("debug", "a$token-with-#-in-it")
    assert read_dotenv(str(tmp_path / "absent")) == {}


@pytest.mark.parametrize("text, line", [
    ("A=1\n\n# comment\nthis is not a setting\nB=2\n", 4),
    ("A=1\nKEY_WITHOUT_VALUE\n", 2),
    ('A="never closed\nB=2\n', 1),
    ("A=1\r\n\r\nnot a statement\r\n", 3),
])
def test_dotenv_line_that_does_not_parse_is_refused_in_one_line(tmp_path, text, line):
    path = tmp_path / ".env"
    path.write_bytes(text.encode())
    with pytest.raises(ConfigError) as caught:
        read_dotenv(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path} line {line}: expected KEY=VALUE") and "\n" not in message


def test_dotenv_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_dotenv(str(path))


def test_dotenv_near_misses_are_logged_with_the_likely_setting(tmp_path):
    path = tmp_path / ".env"
    path.write_text("SENTINEL_BACKENDS=http://a:1\nEXPECTED_VALIDATOR=48\n\nSENTINEL_BACKEND=http://b:1\n"
                    "backends=http://c:1\nlog_level=debug\nCOMPOSE_PROJECT_NAME=gw\nREDIS_PASSWORD=x\n")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        values = read_dotenv(str(path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert values["EXPECTED_VALIDATOR"] == "48", "only a warning: the file may serve other programs too"
    warnings = {(e["key"], e["line"], e["setting"]) for e in events
                if e.get("log_level") == LogLevel.warn and "setting" in e}
    assert warnings == {("EXPECTED_VALIDATOR", 2, "EXPECTED_VALIDATORS"), ("SENTINEL_BACKEND", 4, "SENTINEL_BACKENDS"),
                        ("backends", 5, "SENTINEL_BACKENDS"), ("log_level", 6, "LOG_LEVEL")}
    lines = [formatEvent(e) for e in events if e.get("key") == "EXPECTED_VALIDATOR"]
    assert lines == [f"{path} line 2: EXPECTED_VALIDATOR is not a setting; did you mean EXPECTED_VALIDATORS?"]


def test_every_setting_is_documented():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    reference = (root / "docs" / "configuration.md").read_text()
    readme = (root / "README.md").read_text()
    for spec in SPECS:
        for text in (reference, readme):
            assert f"`{spec.env}`" in text and f"`--{spec.option}`" in text, spec.env
            if spec.default:
                assert f"`{spec.default}`" in text, spec.env


def test_backends_may_be_named():
    s = load(env={"SENTINEL_BACKENDS": "archiver-1=http://a:8080, http://b:8080/rpc?,"[:-2]})
    assert s.backends == (("archiver-1", "http://a:8080"), ("", "http://b:8080/rpc"))
    assert load(env={"SENTINEL_BACKENDS": "http://u:p@a:1/x=y"}).backends == (("", "http://u:p@a:1/x=y"),)


def test_a_memory_rate_limit_is_refused_with_several_workers():
    with pytest.raises(ConfigError, match=r"invalid RATE_LIMIT: memory counts per worker, so 2 workers .*redis://"):
        load(env={"RATE_LIMIT": "memory", "WORKERS": "2"})
    assert load(env={"RATE_LIMIT": "memory", "WORKERS": "1"}).rate_limit == "memory"
    assert load(env={"RATE_LIMIT": "redis://127.0.0.1:6379", "WORKERS": "2"}).workers == 2


def test_protected_metrics_need_a_token_someone_can_present():
    backends = {"SENTINEL_BACKENDS": "http://a:1"}
    with pytest.raises(ConfigError, match=r"invalid PROTECT_METRICS: on, but neither ADMIN_TOKEN nor METRICS_TOKEN"):
        load(env={**backends, "PROTECT_METRICS": "on"})
    assert load(env={**backends, "PROTECT_METRICS": "on", "METRICS_TOKEN": "m" * 20}).protect_metrics
    assert load(env={**backends, "PROTECT_METRICS": "on", "ADMIN_TOKEN": "a" * 20}).protect_metrics
