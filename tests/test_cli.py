"""The ``sentinel-proxy`` command: --version, check-config (the daemon's own check, without starting)
and run (twistd's runner in this process)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import twisted

from sentinel_proxy import __version__
from sentinel_proxy.check_config import check_config, misspelt_variables
from sentinel_proxy.cli import main
from sentinel_proxy.config import SPECS
from tests import processes
from tests.processes import CLEAN_ENV, Daemon, fetch, poll
from tests.tls_support import self_signed, ssl_endpoint

SENTINEL_PROXY = str(Path(sys.executable).with_name("sentinel-proxy"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (no .env) and no setting in the environment."""
    monkeypatch.chdir(tmp_path)
    for spec in SPECS:
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.delenv("PORT", raising=False)
    return tmp_path


def checked(args: list[str]) -> tuple[int, list[str], list[str]]:
    out, err = io.StringIO(), io.StringIO()
    code = check_config(args, out, err)
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


def test_version_names_the_gateway_twisted_and_python(capsys):
    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"sentinel-proxy {__version__} (Twisted {twisted.__version__}, Python 3.")


def test_no_command_or_an_unknown_one_says_what_there_is(capsys):
    assert main([]) == 2 and "check-config" in capsys.readouterr().err
    assert main(["chek-config"]) == 2
    assert capsys.readouterr().err == "sentinel-proxy: unknown command 'chek-config': run, check-config or --version\n"


def test_check_config_prints_the_effective_configuration_with_secrets_masked(workdir, monkeypatch):
    (workdir / ".env").write_text("SENTINEL_BACKENDS=pr1=https://user:pass@node-1:8443/rpc,http://node-2:8080\n"
                                  "MAX_BLOCK_LAGG=5\n")
    monkeypatch.setenv("ADMIN_TOKEN", "t0ps3cret-t0ps3cret")
    monkeypatch.setenv("PORT", "9000")
    code, out, err = checked(["--listen", "tcp:8080", "--listen", "unix:gateway.sock",
                              "--cache", "redis://:hunter2hunter2@redis:6379/0"])
    assert code == 0, err
    assert "SENTINEL_BACKENDS=pr1=https://node-1:8443,http://node-2:8080" in out
    assert 'PROXY_LISTEN="tcp:8080 unix:gateway.sock"' in out
    assert "ADMIN_TOKEN=***" in out and "METRICS_TOKEN=" in out
    assert "MAX_BLOCK_LAG=10" in out and "ACCESS_LOG=on" in out
    assert len(out) == len(SPECS)
    text = "\n".join(out + err)
    assert "t0ps3cret" not in text and "hunter2" not in text and "pass@" not in text
    assert err == ["sentinel-proxy: warning: .env line 2: MAX_BLOCK_LAGG is not a setting; did you mean MAX_BLOCK_LAG?",
                   "sentinel-proxy: warning: environment variable PORT is not a setting; did you mean PROXY_PORT?",
                   "sentinel-proxy: configuration OK (2 listener(s): tcp:8080 unix:gateway.sock)"]


def test_check_config_gives_one_line_per_problem_and_exits_1(workdir):
    (workdir / ".env").write_text("HEALTH_CHECK_INTERVAL_MS=soon\n")
    code, out, err = checked(["--listen", "tcp:8080", "--listen", "tcp:80:backlog=many", "--workers", "2",
                              "--rate-limit", "memory"])
    assert (code, out) == (1, [])
    assert err == [
        "sentinel-proxy: invalid HEALTH_CHECK_INTERVAL_MS (.env): 'soon' is not a whole number",
        "sentinel-proxy: SENTINEL_BACKENDS is not set: give the Aztec node URLs, e.g. --backends "
        "http://node1:8080,http://node2:8080 (or run with --demo)",
        "sentinel-proxy: invalid --listen: 'tcp:80:backlog=many' is not a usable endpoint: "
        "invalid literal for int() with base 10: 'many'",
        "sentinel-proxy: invalid RATE_LIMIT: memory counts per worker, so 2 workers would allow 2x the rate; "
        "use RATE_LIMIT=redis://HOST:6379 with WORKERS > 1",
    ]


def test_check_config_checks_tls_files(workdir):
    key, cert = self_signed(workdir)
    code, out, err = checked(["--demo", "--listen", ssl_endpoint(key, cert, 8443)])
    assert code == 0 and err[-1].startswith("sentinel-proxy: configuration OK (1 listener(s): ssl:8443:")
    code, _, err = checked(["--demo", "--listen", ssl_endpoint(key, workdir / "absent.pem", 8443)])
    assert code == 1 and err == [f"sentinel-proxy: invalid --listen: {ssl_endpoint(key, workdir / 'absent.pem', 8443)!r}: "
                                 f"cannot read {workdir / 'absent.pem'}: No such file or directory"]


def test_only_variables_that_look_like_settings_are_called_misspelt():
    assert misspelt_variables({"PATH": "/bin", "HOME": "/root", "HTTPS_PROXY": "x", "NO_PROXY": "x",
                               "PROXY_PORT": "1", "SENTINEL_BACKEND": "x", "WORKER": "2"}) == [
        "environment variable SENTINEL_BACKEND is not a setting; did you mean SENTINEL_BACKENDS?",
        "environment variable WORKER is not a setting; did you mean WORKERS?"]


def run_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SENTINEL_PROXY, *args], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_the_installed_command(tmp_path):
    assert run_command(["--version"], tmp_path).stdout.startswith(f"sentinel-proxy {__version__} ")
    good = run_command(["check-config", "--demo"], tmp_path)
    assert good.returncode == 0 and "PROXY_LISTEN=tcp:8080" in good.stdout.splitlines(), good.stderr
    bad = run_command(["check-config", "--demo", "--listen", "tcp:0", "--listen", "tpc:0"], tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == ("sentinel-proxy: invalid --listen: 'tpc:0' is not a usable endpoint: "
                          "Unknown endpoint type: 'tpc'\n")
    start = run_command(["run", "--demo", "--listen", "tcp:0", "--listen", "tpc:0"], tmp_path)
    assert (start.returncode, start.stderr) == (1, bad.stderr), "a start refuses it in the same one line"


@pytest.mark.slow
def test_run_is_twistd_in_the_foreground(tmp_path, monkeypatch):
    """Both listeners serve, SIGTERM drains and the exit status is 0, as under twistd."""
    key, cert = self_signed(tmp_path)
    monkeypatch.setattr(processes, "TWISTD", [SENTINEL_PROXY, "run"])
    daemon = Daemon(["--demo", "--listen", "tcp:0:interface=127.0.0.1", "--listen", ssl_endpoint(key, cert)],
                    tmp_path)
    try:
        port = daemon.wait_for_line(r"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\): "
                                    r"dashboard at http://127\.0\.0\.1:\d+/dashboard").group(1)
        daemon.wait_for_line(r"listening on .*: dashboard at https://127\.0\.0\.1:\d+/dashboard")
        daemon.wait_for_line(rf"demo: open http://127\.0\.0\.1:{port}/dashboard in a browser")
        base = f"http://127.0.0.1:{port}"
        assert poll(lambda: fetch(base + "/ready") == (200, b"READY"), timeout=15), "never ready"
        status, body = fetch(base + "/", json.dumps(
            [{"jsonrpc": "2.0", "id": 0, "method": "node_getBlockNumber", "params": []}]).encode())
        assert status == 200 and isinstance(json.loads(body)[0]["result"], int)
    finally:
        code = daemon.stop()
    log = "".join(daemon.lines)
    assert code == 0, log
    assert "received SIGTERM: closing the listener and draining" in log and "Traceback" not in log
    assert not (tmp_path / "twistd.pid").exists()
