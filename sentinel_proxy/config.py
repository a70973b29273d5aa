"""Settings from every source: the one place where defaults, ``.env``, the environment and CLI
options meet.

Precedence, lowest to highest: built-in default, profile default (``--demo``), ``.env`` file in the
working directory, process environment, ``twistd sentinel-proxy`` option. What each setting is, and
how its value is checked, is the table in :mod:`sentinel_proxy.settings`.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any, Mapping

from dotenv.parser import Binding, parse_stream
from twisted.logger import Logger

from sentinel_proxy.listening import server_endpoint
from sentinel_proxy.ops.logs import observer
from sentinel_proxy.settings import RELOADABLE, SECRET_SETTINGS, SPECS, SPECS_BY_FIELD, Settings, Spec

__all__ = ["ConfigError", "DEMO_DEFAULTS", "RELOADABLE", "SECRET_SETTINGS", "SPECS", "SPECS_BY_FIELD", "Settings",
           "Spec", "likely_setting", "load_settings", "read_dotenv"]

log = Logger(observer=observer)


class ConfigError(ValueError):
    """Settings we refuse to start with: one line for the operator per problem, all of them at once,
    so a broken configuration is fixed in one round rather than one line per start."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = problems


#: ``--demo`` runs a simulated devnet-sized chain (8 slots per epoch, as Aztec devnet; committee 8)
#: and checks often, so every feature is visible within seconds.
DEMO_DEFAULTS: Mapping[str, str] = {
    "SLOTS_PER_EPOCH": "8",
    "EXPECTED_VALIDATORS": "8",
    "HEALTH_CHECK_INTERVAL_MS": "2000",
    "INTEGRITY_CHECK_INTERVAL_MS": "10000",
}

_NEWLINE = re.compile(r"\r\n|\n|\r")


def _line_of(binding: Binding) -> int:
    """The line the statement starts on: python-dotenv counts from the end of the previous
    statement, blank lines and comments before this one included."""
    text = binding.original.string
    return binding.original.line + len(_NEWLINE.findall(text[:len(text) - len(text.lstrip())]))


_BY_ENV = {spec.env: spec for spec in SPECS}


def likely_setting(key: str) -> Spec | None:
    """The setting an unknown key was probably meant to be: a typo, the option's name
    (``BACKENDS`` for ``--backends``), or the right name in the wrong case."""
    for spec in SPECS:
        if key.lower().replace("_", "-") == spec.option:
            return spec
    close = difflib.get_close_matches(key.upper(), list(_BY_ENV), n=1, cutoff=0.7)
    return _BY_ENV[close[0]] if close else None


def read_dotenv(path: str) -> dict[str, str]:
    """The ``KEY=VALUE`` pairs of a ``.env`` file, parsed by python-dotenv (quotes, escapes,
    ``export``, comments), without ``${VAR}`` interpolation: a ``$`` in a token or password is
    kept as written.

    A statement python-dotenv cannot parse, or a key without ``=``, is an error rather than
    skipped with a warning, since a typo there would otherwise start the gateway with a default the
    operator did not mean. A key that is not a setting but looks like one is logged.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            bindings = list(parse_stream(handle))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    values: dict[str, str] = {}
    for binding in bindings:
        if binding.error or (binding.key is not None and binding.value is None):
            raise ConfigError(f"{path} line {_line_of(binding)}: expected KEY=VALUE, "
                              f"got {binding.original.string.strip()[:80]!r}")
        if binding.key is None or binding.value is None:  # blank lines and comments
            continue
        values[binding.key] = binding.value
        likely = None if binding.key in _BY_ENV else likely_setting(binding.key)
        if likely is not None:
            log.warn("{path} line {line}: {key} is not a setting; did you mean {setting}?", path=path,
                     line=_line_of(binding), key=binding.key, setting=likely.env)
    return values


def load_settings(
    cli: Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = ".env",
    demo: bool = False,
) -> Settings:
    """Merge every source and validate each value once.

    ``cli`` maps field names to option values (``None`` when the option was not given).
    """
    cli = cli or {}
    environ = os.environ if environ is None else environ
    layers: list[tuple[Mapping[str, str], str]] = []
    if demo:
        layers.append((DEMO_DEFAULTS, "demo default"))
    if dotenv_path:
        layers.append((read_dotenv(dotenv_path), dotenv_path))
    layers.append((environ, "environment"))

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    problems: list[str] = []
    #: Settings that did not parse: reported once, not again by every rule that reads them.
    failed: set[str] = set()
    for spec in SPECS:
        raw, origin = spec.default, "default"
        for layer, name in layers:
            if spec.env in layer:
                raw, origin = layer[spec.env], name
        if cli.get(spec.field) is not None:
            raw, origin = cli[spec.field], "option"
        origins[spec.field] = origin
        values[spec.field] = None
        if raw is None:
            continue
        try:
            values[spec.field] = spec.parse(raw)
        except ValueError as exc:
            problems.append(f"invalid {_where(spec, origin)}: {exc}")
            failed.add(spec.field)

    if values["backends"] is None and "backends" not in failed:
        if not demo:
            problems.append(
                "SENTINEL_BACKENDS is not set: give the Aztec node URLs, "
                "e.g. --backends http://node1:8080,http://node2:8080 (or run with --demo)")
        values["backends"] = ()
    if values["listen"] is None and not failed & {"listen", "port"}:
        values["listen"] = (f"tcp:{values['port']}",)
    for description in values["listen"] or ():
        try:
            server_endpoint(None, description)  # parses (and loads TLS files); listens on nothing
        except ValueError as exc:
            problems.append(f"invalid {_where(SPECS_BY_FIELD['listen'], origins['listen'])}: {exc}")
    if values["workers"] is not None and values["workers"] > 1:
        for listen in values["listen"] or ():
            parts = listen.split(":")
            if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) == 0:
                problems.append(f"invalid WORKERS: {values['workers']} workers need a fixed TCP port to share, "
                                f"not {listen!r}")
        if values["rate_limit"] == "memory":
            # Each worker would keep its own buckets and allow the whole rate: N times the limit.
            problems.append(f"invalid RATE_LIMIT: memory counts per worker, so {values['workers']} workers "
                            f"would allow {values['workers']}x the rate; use RATE_LIMIT=redis://HOST:6379 "
                            f"with WORKERS > 1")
    if values["protect_metrics"] and not values["admin_token"] and not values["metrics_token"] \
            and not failed & {"admin_token", "metrics_token"}:
        problems.append("invalid PROTECT_METRICS: on, but neither ADMIN_TOKEN nor METRICS_TOKEN is set, so no "
                        "scraper could read /metrics; set METRICS_TOKEN")
    if values["tracing"] == "otlp":
        from sentinel_proxy.ops.tracing import otlp_missing  # only when asked for: it imports opentelemetry

        missing = otlp_missing()
        if missing is not None:
            problems.append(f"invalid TRACING: otlp needs the otel extra ({missing} is not installed): "
                            "pip install 'sentinel-proxy[otel]'")
    if problems:
        raise ConfigError(*problems)
    return Settings(demo=demo, **values)


def _where(spec: Spec, origin: str) -> str:
    return f"--{spec.option}" if origin == "option" else f"{spec.env} ({origin})"
