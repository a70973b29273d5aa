"""``twistd sentinel-proxy``: its options, and the service they configure.

The options are kept as text and the whole configuration (options, environment, ``.env``) is
checked in ``postOptions`` by :func:`~sentinel_proxy.config.load_settings`, so every bad value
stops ``twistd`` at once, one line per problem on stderr and a non-zero exit, never a traceback;
``sentinel-proxy check-config`` runs the same check. The gateway itself is built by
:func:`sentinel_proxy.service.build_service`.
"""
from __future__ import annotations

from typing import Any, Sequence

from twisted.application.service import MultiService
from twisted.python import usage

from sentinel_proxy.config import SPECS, SPECS_BY_FIELD, ConfigError, Settings, Spec, load_settings
from sentinel_proxy.ops import heap
from sentinel_proxy.ops.descriptors import ensure_open_files
from sentinel_proxy.service import build_service
from sentinel_proxy.twisted_private import dispatch_io_directly


def _help(spec: Spec) -> str:
    return f"{spec.help} [{spec.env}" + (f", default {spec.default}]" if spec.default is not None else "]")


_LISTEN = SPECS_BY_FIELD["listen"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("JSON-RPC gateway in front of Aztec nodes. Every option can also be set with the "
                "environment variable named in its help, or in a .env file in the working directory; "
                "the option wins.")
    optFlags = [["demo", None, "run four simulated Aztec nodes in this process and proxy to them"]]
    #: Text, not coerced: ``load_settings`` merges the options with the other sources as text (and
    #: again on every reload), and judges them all at once.
    optParameters = [[spec.option, None, None, _help(spec)] for spec in SPECS if spec is not _LISTEN]

    #: The configuration of every source, set once the options are parsed.
    settings: Settings

    def __init__(self) -> None:
        super().__init__()
        #: Every --listen, in order: each one adds a listener, as with ``twistd web``.
        self.listen: list[str] = []

    def opt_listen(self, description: str) -> None:
        self.listen.append(description)

    opt_listen.__doc__ = _help(_LISTEN)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """A configuration error ends the process with one line per problem on stderr: twistd itself
        would print the whole ``--help`` (sixty options) to stdout first, burying them."""
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            raise SystemExit("\n".join(f"sentinel-proxy: {line}" for line in str(exc).splitlines())) from None

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(cli=self.cli_values(), demo=bool(self["demo"]))
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None

    def cli_values(self) -> dict[str, str | None]:
        """The options as text, field by field; the --listen endpoints joined as PROXY_LISTEN joins them."""
        return {spec.field: (" ".join(self.listen) or None) if spec is _LISTEN else self[spec.option]
                for spec in SPECS}


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """twistd's entry point: the gateway of the parsed options, draining on SIGTERM and
    reloading on SIGHUP."""
    settings = options.settings
    nodes = len(settings.backends)
    if settings.demo:
        from sentinel_proxy.demo import DEMO_SCENARIOS  # the simulator only with --demo

        nodes += len(DEMO_SCENARIOS)
    ensure_open_files(settings.max_connections, nodes, settings.upstream_max_connections)
    gateway = build_service(settings, reactor, cli=options.cli_values(), handle_signals=True)
    dispatch_io_directly(gateway.reactor)  # the daemon's own reactor: its I/O without the legacy log context
    heap.settle()  # a daemon's process: start-up's objects are built, requests come next
    return gateway
