"""``twistd sentinel-proxy``: its options, and the service they configure.

Each option is checked by its setting's own parser as it is parsed, and the whole configuration
(options, environment, ``.env``) in ``postOptions``, so a bad value stops ``twistd`` with one line
on stderr and a non-zero exit, never a traceback. The gateway itself is built by
:func:`sentinel_proxy.service.build_service`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import MultiService
from twisted.python import usage

from sentinel_proxy.config import SPECS, ConfigError, Settings, Spec, load_settings
from sentinel_proxy.ops.descriptors import ensure_open_files
from sentinel_proxy.service import build_service


def _checked(spec: Spec) -> Callable[[str], str]:
    """The option's coercer. It keeps the text: ``load_settings`` merges the options with the other
    sources as text, and merges them again on every reload."""
    def check(raw: str) -> str:
        try:
            spec.parse(raw)
        except ValueError as exc:  # usage would wrap a ValueError in "Parameter type enforcement failed"
            raise usage.UsageError(f"invalid --{spec.option}: {exc}") from None
        return raw

    return check


def _help(spec: Spec) -> str:
    return f"{spec.help} [{spec.env}" + (f", default {spec.default}]" if spec.default is not None else "]")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("JSON-RPC gateway in front of Aztec nodes. Every option can also be set with the "
                "environment variable named in its help, or in a .env file in the working directory; "
                "the option wins.")
    optFlags = [["demo", None, "run four simulated Aztec nodes in this process and proxy to them"]]
    optParameters = [[spec.option, None, None, _help(spec), _checked(spec)] for spec in SPECS]

    #: The configuration of every source, set once the options are parsed.
    settings: Settings

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """A configuration error ends the process with its one line on stderr: twistd itself
        would print the whole ``--help`` (sixty options) to stdout first, burying it."""
        try:
            super().parseOptions(options)
        except usage.UsageError as exc:
            raise SystemExit(f"sentinel-proxy: {exc}") from None

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(cli=self.cli_values(), demo=bool(self["demo"]))
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None

    def cli_values(self) -> dict[str, str | None]:
        return {spec.field: self[spec.option] for spec in SPECS}


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """twistd's entry point: the gateway of the parsed options, draining on SIGTERM and
    reloading on SIGHUP."""
    settings = options.settings
    nodes = len(settings.backends)
    if settings.demo:
        from sentinel_proxy.demo import DEMO_SCENARIOS  # the simulator only with --demo

        nodes += len(DEMO_SCENARIOS)
    ensure_open_files(settings.max_connections, nodes, settings.upstream_max_connections)
    return build_service(settings, reactor, cli=options.cli_values(), handle_signals=True)
