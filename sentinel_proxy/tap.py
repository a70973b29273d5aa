"""``twistd sentinel-proxy``: options and the service tree.

``makeService`` only turns options into :class:`~sentinel_proxy.config.Settings` (one line on
stderr and a non-zero exit for a bad value, no traceback); :func:`build_service` wires the parts
and is what tests call with their own reactor and settings.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure

from . import logs
from .backends import BackendPool
from .checks import HealthService, IntegrityService
from .config import SPECS, ConfigError, Settings, load_settings
from .forwarder import Forwarder
from .integrity import IntegrityParams
from .metrics import Metrics
from .upstream import UpstreamClient

log = Logger(observer=logs.observer)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("JSON-RPC gateway in front of Aztec nodes. Every option can also be set with the "
                "environment variable named in its help, or in a .env file in the working directory; "
                "the option wins.")
    optFlags = [["demo", None, "run four simulated Aztec nodes in this process and proxy to them"]]
    optParameters = [
        [spec.option, None, None,
         f"{spec.help} [{spec.env}" + (f", default {spec.default}]" if spec.default is not None else "]")]
        for spec in SPECS
    ]

    def cli_values(self) -> dict[str, str | None]:
        return {spec.field: self[spec.option] for spec in SPECS}


class ListenService(Service):
    """Listens on an endpoint string; exposes the bound port so tests can use ``tcp:0``."""

    def __init__(self, description: str, factory: Any, reactor: Any, demo: bool = False):
        self._description = description
        self._demo = demo
        self._factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        listening = serverFromString(self._reactor, self._description).listen(self._factory)
        failures: list[Failure] = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:  # TCP/UNIX endpoints fail synchronously: refuse to start rather than idle deaf
            raise SystemExit(f"sentinel-proxy: cannot listen on {self._description}: {failures[0].value}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info("sentinel-proxy listening on {address}", address=str(address))
        if self._demo and hasattr(address, "port"):
            url = f"http://127.0.0.1:{address.port}"
            log.info("demo: open {url}/health, or try: curl -s -H 'Content-Type: application/json' -d "
                     "'[{{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"node_getBlockNumber\",\"params\":[]}}]' "
                     "{url}/", url=url)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


class UpstreamService(Service):
    """Closes pooled upstream connections on shutdown."""

    def __init__(self, upstream: UpstreamClient):
        self.upstream = upstream

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.upstream.close()


class GatewayService(MultiService):
    """The whole gateway; its attributes are the parts tests and the demo need to reach."""

    def __init__(self, settings: Settings, reactor: Any):
        super().__init__()
        from .web import (  # klein installs the default reactor: import late
            GatewayApp,
            make_site,
        )

        self.settings = settings
        self.pool = BackendPool(settings.backends, max_block_lag=settings.max_block_lag)
        self.upstream = UpstreamClient(reactor, settings.upstream_max_connections,
                                       settings.upstream_idle_timeout_ms / 1000.0)
        self.metrics = Metrics(self.pool)
        self.forwarder = Forwarder(self.pool, self.upstream, self.metrics, reactor, settings.max_batch_size,
                                   settings.max_body_bytes, settings.request_timeout, settings.access_log)
        app = GatewayApp(self.forwarder, self.pool, self.metrics, reactor)

        if settings.demo:
            from .demo import DemoNodesService

            DemoNodesService(self.pool, settings, reactor).setServiceParent(self)
        HealthService(self.pool, self.upstream, settings.health_check_interval_ms / 1000.0,
                      settings.request_timeout, reactor, self.metrics).setServiceParent(self)
        IntegrityService(self.pool, self.upstream, settings.integrity_check_interval_ms / 1000.0,
                         settings.request_timeout, reactor, integrity_params(settings),
                         runner=partial(threads.deferToThreadPool, reactor, reactor.getThreadPool()),
                         metrics=self.metrics).setServiceParent(self)
        UpstreamService(self.upstream).setServiceParent(self)
        self.listener = ListenService(settings.listen, make_site(app.resource(), settings.max_body_bytes), reactor,
                                      demo=settings.demo)
        self.listener.setServiceParent(self)


    def setServiceParent(self, parent: Any) -> None:
        """Under twistd the parent is the Application: hand it the JSON observer when asked for."""
        super().setServiceParent(parent)
        if self.settings.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, logs.json_observer())


def integrity_params(settings: Settings) -> IntegrityParams:
    return IntegrityParams(
        slots_per_epoch=settings.slots_per_epoch,
        expected_validators=settings.expected_validators,
        check_epochs=settings.integrity_check_epochs,
        score_threshold=settings.integrity_score_threshold,
        archiver_threshold_epochs=settings.archiver_threshold_epochs,
    )


def build_service(settings: Settings, reactor: Any = None) -> GatewayService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    logs.set_level(settings.log_level)
    return GatewayService(settings, reactor)


def makeService(options: Options, reactor: Any = None) -> GatewayService:
    try:
        settings = load_settings(cli=options.cli_values(), demo=bool(options["demo"]))
    except ConfigError as exc:
        raise SystemExit(f"sentinel-proxy: {exc}") from None
    return build_service(settings, reactor)
