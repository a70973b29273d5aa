"""Logging: one observer every module logs through, so LOG_LEVEL applies in one place, and the
JSON-lines observer for log shippers.

twistd installs its own global observer after the service is built. With ``LOG_FORMAT=text`` the
gateway keeps it (so ``--logfile`` and ``--syslog`` work) and filters its own events on their way
there; with ``json`` it hands twistd a JSON-lines observer for stdout through the application's
``ILogObserver`` component, which then carries every event, Twisted's included, filtered by level.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate,
                            formatEvent, globalLogPublisher)
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])

_PLAIN = (str, int, float, bool, type(None))


def set_level(name: str) -> None:
    """Apply LOG_LEVEL (one of :data:`LEVELS`) to every sentinel-proxy logger."""
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(item, _PLAIN) for item in value)
    return False


@implementer(ILogObserver)
class JsonLinesObserver:
    """One flat JSON object per event and line: time, level, namespace, message, named fields."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and _plain(value):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def json_observer(stream: IO[str] | None = None) -> FilteringLogObserver:
    return FilteringLogObserver(JsonLinesObserver(stream or sys.stdout), [_predicate])
