"""The project's log observer: every module logs through it so LOG_LEVEL applies in one place.

twistd installs its own global observer after the service is built, so instead of replacing it
we filter our own events on their way to it.
"""
from __future__ import annotations

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def set_level(name: str) -> None:
    """Apply LOG_LEVEL (one of :data:`LEVELS`) to every sentinel-proxy logger."""
    _predicate.setLogLevelForNamespace("", LEVELS[name])
