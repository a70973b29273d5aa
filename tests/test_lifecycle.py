"""The lifecycle rules on their own: what a reload applies, logs and refuses, and the drain's order."""
from __future__ import annotations

from dataclasses import replace

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent

from sentinel_proxy import lifecycle
from sentinel_proxy.config import ConfigError, load_settings

OLD_TOKEN = "old-admin-token-0123456789"
NEW_TOKEN = "new-admin-token-9876543210"


def settings(**cli: str):
    return load_settings(cli={"backends": "http://u:secret-pw@a:1", "admin_token": OLD_TOKEN, **cli}, environ={},
                         dotenv_path=None)


def test_reload_applies_what_may_change_live_and_keeps_the_rest(logged):
    running = settings()
    loaded = settings(admin_token=NEW_TOKEN, log_level="debug", port="9999", backends="http://u:new-pw@a:1")
    applied: list = []
    now = lifecycle.reload(running, lambda: loaded, applied.append)
    assert applied == [now]
    assert (now.admin_token, now.log_level, now.backends) == (NEW_TOKEN, "debug", loaded.backends)
    assert now.port == running.port, "the listening port takes a restart"
    lines = [formatEvent(e) for e in logged if e.get("log_namespace") == "sentinel_proxy.lifecycle"]
    text = "\n".join(lines)
    assert "reload: port changed but takes a restart; keeping 8080" in text
    assert "reload: admin_token *** -> ***" in text and "reload: log_level info -> debug" in text
    assert not any(secret in text for secret in (OLD_TOKEN, NEW_TOKEN, "secret-pw", "new-pw"))


def test_reload_refuses_a_bad_configuration_as_a_whole(logged):
    running = settings()

    def load():
        raise ConfigError("invalid REQUEST_TIMEOUT_MS (.env): 'abc' is not a whole number")

    applied: list = []
    assert lifecycle.reload(running, load, applied.append) is running and applied == []
    refused = [e for e in logged if e.get("log_level") == LogLevel.error]
    assert [formatEvent(e) for e in refused] == [
        "reload refused, keeping the running configuration: invalid REQUEST_TIMEOUT_MS (.env): 'abc' is not a "
        "whole number"]


def test_reload_without_a_change_applies_nothing(logged):
    running = settings()
    applied: list = []
    assert lifecycle.reload(running, lambda: replace(running), applied.append) is running and applied == []


class Recorder(Service):
    def __init__(self, name: str, order: list[str]):
        self.name = name
        self._order = order

    def stopService(self) -> None:
        super().stopService()
        self._order.append(f"stop {self.name}")


class Requests:
    def __init__(self):
        self.in_flight = 1
        self.waiting: defer.Deferred[None] = defer.Deferred()

    def drained(self) -> defer.Deferred[None]:
        return self.waiting


class Connections:
    def __init__(self, order: list[str]):
        self._order = order

    def drain(self, clock) -> None:
        self._order.append("answers say close")

    async def settle(self, clock, timeout: float) -> None:
        self._order.append(f"settle within {timeout:.1f} s")

    async def close_all(self, clock, timeout: float) -> None:
        self._order.append(f"close connections within {timeout:.1f} s")


def test_drain_says_close_keeps_listening_for_the_delay_then_waits_then_stops_the_rest(logged):
    clock, order, requests = task.Clock(), [], Requests()
    others = [Recorder("checks", order), Recorder("pool", order)]
    for service in others:
        service.startService()
    draining = defer.Deferred.fromCoroutine(lifecycle.drain(clock, 0.5, 3.0, Recorder("listener", order), requests,
                                                            Connections(order), others))
    assert order == ["answers say close"], "the listener stays open for the drain delay"
    clock.advance(0.5)
    assert order == ["answers say close", "stop listener"]
    clock.advance(1.0)
    assert order == ["answers say close", "stop listener"], "nothing else stops while a request is in flight"
    requests.in_flight = 0
    requests.waiting.callback(None)
    assert order == ["answers say close", "stop listener", "settle within 2.0 s", "close connections within 2.0 s",
                     "stop checks", "stop pool"]
    assert draining.called


def test_drain_gives_up_on_requests_after_the_grace(logged):
    clock, order, requests = task.Clock(), [], Requests()
    draining = defer.Deferred.fromCoroutine(lifecycle.drain(clock, 0.0, 3.0, Recorder("listener", order), requests,
                                                            Connections(order), []))
    clock.advance(2.9)
    assert not draining.called
    clock.advance(0.1)
    assert draining.called and order == ["answers say close", "stop listener", "settle within 0.0 s",
                                         "close connections within 0.5 s"]
    assert "1 requests still in flight after 3.0 s; stopping anyway" in [formatEvent(e) for e in logged]


def test_closing_service_closes_its_resource_on_stop():
    closed: list[bool] = []

    class Resource:
        def close(self) -> defer.Deferred[None]:
            closed.append(True)
            return defer.succeed(None)

    service = lifecycle.ClosingService(Resource())
    service.startService()
    assert closed == []
    assert service.stopService().called and closed == [True]
