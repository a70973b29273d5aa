"""``sentinel-proxy check-config``: the daemon's own configuration check, without starting it.

The options are parsed by :class:`sentinel_proxy.tap.Options`, the class ``twistd sentinel-proxy``
parses them with, so the environment, ``.env`` and options are merged and judged by the very code
a start runs (:func:`sentinel_proxy.config.load_settings`): every value, the listen endpoints
(parsed by Twisted, their TLS files loaded), the rules between settings. What it adds is what a
start has no place to say: environment variables that look like a misspelt setting, and the
effective configuration.
"""
from __future__ import annotations

import os
from typing import IO, Any, Mapping, Sequence

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from sentinel_proxy.config import SPECS, Settings, likely_setting
from sentinel_proxy.ops.admin import masked

_WARNINGS = (LogLevel.warn, LogLevel.error, LogLevel.critical)
_KNOWN = frozenset(spec.env for spec in SPECS)


def misspelt_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per environment variable that is not a setting but looks like one (``PORT``,
    ``SENTINEL_BACKEND``). The environment is shared with everything else on the host, so a start
    does not say this; ``.env`` is the gateway's own, and a start warns about it (config.py)."""
    warnings = []
    for key in sorted(environ):
        likely = None if key in _KNOWN else likely_setting(key)
        if likely is not None:
            warnings.append(f"environment variable {key} is not a setting; did you mean {likely.env}?")
    return warnings


def shown(field: str, value: Any) -> str:
    """A setting's effective value as a ``.env`` line would write it, secrets masked."""
    value = masked(field, value)
    if field == "backends":
        return ",".join(f"{node['name']}={node['url']}" if node["name"] else node["url"] for node in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        text = (" " if field == "listen" else ",").join(str(item) for item in value)
        return f'"{text}"' if " " in text else text
    return str(value)


def effective(settings: Settings) -> list[str]:
    lines = [f"{spec.env}={shown(spec.field, getattr(settings, spec.field))}" for spec in SPECS]
    if settings.demo:
        lines.append("# --demo: four simulated nodes in the gateway's process")
    return lines


def check_config(args: Sequence[str], out: IO[str], err: IO[str]) -> int:
    """0 and the effective configuration when a start would accept it; 1 and one line per problem
    when it would refuse it. Warnings (a ``.env`` key or a variable that looks misspelt) go to
    ``err`` either way."""
    from sentinel_proxy.tap import Options

    logged: list[str] = []

    def keep(event: dict[str, Any]) -> None:
        if event.get("log_level") in _WARNINGS:
            logged.append(formatEvent(event))

    globalLogPublisher.addObserver(keep)
    try:
        options = Options()
        options.parseOptions(list(args))
        problems = None
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            return 0
        problems = str(exc.code)
    finally:
        globalLogPublisher.removeObserver(keep)
    for warning in logged + misspelt_variables(os.environ):
        err.write(f"sentinel-proxy: warning: {warning}\n")
    if problems is not None:
        err.write(problems + "\n")
        return 1
    out.write("\n".join(effective(options.settings)) + "\n")
    err.write(f"sentinel-proxy: configuration OK ({len(options.settings.listen)} listener(s): "
              f"{' '.join(options.settings.listen)})\n")
    return 0
