"""``twistd sentinel-proxy``'s options: every refusal is one line, and makeService builds the tree."""
import gc

import pytest
from twisted.application.service import MultiService

from sentinel_proxy.config import SPECS
from sentinel_proxy.tap import Options, makeService


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (no .env) and no setting in the environment."""
    monkeypatch.chdir(tmp_path)
    for spec in SPECS:
        monkeypatch.delenv(spec.env, raising=False)
    return tmp_path


def refusal(args: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(args)
    message = str(caught.value.code)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("args, message", [
    (["--backends", "http://a:1", "--port", "x"], "sentinel-proxy: invalid --port: 'x' is not a whole number"),
    (["--backends", "http://a:1", "--port", "70000"], "sentinel-proxy: invalid --port: '70000' is above the maximum"),
    (["--demo", "--log-level", "loud"], "sentinel-proxy: invalid --log-level: 'loud' is not one of"),
    (["--backends", "ftp://x"], "sentinel-proxy: invalid --backends: 'ftp://x' is not an http"),
    (["--demo", "--admin-token", "short"], "sentinel-proxy: invalid --admin-token: is shorter than 16 characters"),
    (["--bogus"], "sentinel-proxy: option --bogus not recognized"),
    (["--demo", "--listen", "tcp:http"], "sentinel-proxy: invalid --listen: 'tcp:http' is not a usable endpoint: "),
    (["--demo", "--listen", "carrier-pigeon:1"], "sentinel-proxy: invalid --listen: 'carrier-pigeon:1' is not a usable "
                                                 "endpoint: Unknown endpoint type: 'carrier-pigeon'"),
    (["--demo", "--listen", "ssl:0:privateKey=absent.pem"], "sentinel-proxy: invalid --listen: "
                                                            "'ssl:0:privateKey=absent.pem': cannot read /"),
])
def test_a_bad_option_is_refused_in_one_line(workdir, args, message):
    assert refusal(args).startswith(message)


def test_every_problem_is_one_line_and_all_come_at_once(workdir):
    (workdir / ".env").write_text("MAX_ATTEMPTS=0\n")
    with pytest.raises(SystemExit) as caught:
        Options().parseOptions(["--port", "x", "--listen", "tcp:0", "--listen", "bogus:1", "--workers", "2"])
    assert str(caught.value.code).splitlines() == [
        "sentinel-proxy: invalid --port: 'x' is not a whole number",
        "sentinel-proxy: invalid MAX_ATTEMPTS (.env): '0' is below the minimum of 1",
        "sentinel-proxy: SENTINEL_BACKENDS is not set: give the Aztec node URLs, e.g. --backends "
        "http://node1:8080,http://node2:8080 (or run with --demo)",
        "sentinel-proxy: invalid --listen: 'bogus:1' is not a usable endpoint: Unknown endpoint type: 'bogus'",
        "sentinel-proxy: invalid WORKERS: 2 workers need a fixed TCP port to share, not 'tcp:0'",
        "sentinel-proxy: invalid WORKERS: 2 workers need a fixed TCP port to share, not 'bogus:1'",
    ]


def test_listen_given_several_times_adds_listeners(workdir, monkeypatch):
    options = Options()
    options.parseOptions(["--demo", "--listen", "tcp:0:interface=127.0.0.1", "--listen", "unix:gateway.sock"])
    assert options.settings.listen == ("tcp:0:interface=127.0.0.1", "unix:gateway.sock")
    monkeypatch.setenv("PROXY_LISTEN", " tcp:7001\n\tssl:7002:privateKey=k.pem:certKey=c.pem:"
                                       "sslmethod=TLS_METHOD tcp:7003 ")
    (workdir / "k.pem").write_text("")
    with pytest.raises(SystemExit, match=r"'ssl:7002:privateKey=k.pem:certKey=c.pem:sslmethod=TLS_METHOD': "
                                         r"cannot read /\S+/c.pem: No such file or directory"):
        Options().parseOptions(["--demo"])


def test_the_whole_configuration_is_checked_after_parsing(workdir):
    assert refusal([]).startswith("sentinel-proxy: SENTINEL_BACKENDS is not set")
    assert "workers need a fixed TCP port" in refusal(["--backends", "http://a:1", "--workers", "2", "--listen",
                                                       "tcp:0"])
    (workdir / ".env").write_text("SENTINEL_BACKENDS=http://a:1\n\nINTEGRITY_CHECK_EPOCHS=ten\n")
    assert refusal([]) == "sentinel-proxy: invalid INTEGRITY_CHECK_EPOCHS (.env): 'ten' is not a whole number"
    (workdir / ".env").write_text("SENTINEL_BACKENDS=http://a:1\n\nnot a setting\n")
    assert refusal([]) == "sentinel-proxy: .env line 3: expected KEY=VALUE, got 'not a setting'"


def test_options_win_and_keep_their_text(workdir, monkeypatch):
    (workdir / ".env").write_text("SENTINEL_BACKENDS=http://dotenv:1\nPROXY_PORT=7000\n")
    monkeypatch.setenv("LOG_LEVEL", "warn")
    options = Options()
    options.parseOptions(["--port", "9000", "--demo"])
    assert (options.settings.port, options.settings.log_level, options.settings.demo) == (9000, "warn", True)
    assert options.settings.backends == (("", "http://dotenv:1"),)
    assert options.cli_values()["port"] == "9000", "a reload merges the options again, as text"


def test_make_service_builds_the_gateway(workdir, collector, epoll_reactor):
    from sentinel_proxy.listening import ListeningService

    options = Options()
    options.parseOptions(["--backends", "http://127.0.0.1:9", "--listen", "tcp:0:interface=127.0.0.1"])
    service = makeService(options, reactor=epoll_reactor)
    assert isinstance(service, MultiService) and not service.running
    assert service.settings == options.settings
    assert service.listener in list(service) and isinstance(service.listener, ListeningService)
    assert [b.url for b in service.pool.backends] == ["http://127.0.0.1:9"]


def test_make_service_gives_its_epoll_reactor_the_direct_dispatch(workdir, collector, epoll_reactor):
    options = Options()
    options.parseOptions(["--backends", "http://127.0.0.1:9", "--listen", "tcp:0:interface=127.0.0.1"])
    service = makeService(options, reactor=epoll_reactor)
    assert service.reactor is epoll_reactor and "doIteration" in vars(epoll_reactor), "twisted_private.dispatch_io_directly"


def test_make_service_settles_the_heap(workdir, collector, epoll_reactor):
    from sentinel_proxy.ops import heap

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    options = Options()
    options.parseOptions(["--backends", "http://127.0.0.1:9", "--listen", "tcp:0:interface=127.0.0.1"])
    makeService(options, reactor=epoll_reactor)
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD and gc.get_freeze_count() > 0


@pytest.mark.slow
def test_twistd_refuses_a_bad_option_in_one_line(tmp_path):
    from tests.processes import run_twistd

    result = run_twistd(["sentinel-proxy", "--demo", "--port", "x"], tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "sentinel-proxy: invalid --port: 'x' is not a whole number\n"
