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


class AccessLog:
    """One line per proxied request, written by our own code to stdout in batches.

    Through twisted.logger each line cost ~50 µs (an event, its formatting, a write and a flush
    per line: 12 % of a request, profiled with py-spy); here a line is one f-string (or one
    ``json.dumps``) appended to a buffer that is written every ``FLUSH_INTERVAL`` seconds (and
    when it holds ``FLUSH_LINES``), in the same shape as the rest of the log.
    """

    FLUSH_INTERVAL = 0.2
    FLUSH_LINES = 512

    def __init__(self, stream: IO[str], json_lines: bool):
        self._stream = stream
        self._json = json_lines
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def _prefix(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")
        return self._stamp

    def write(self, now: float, request_id: str, client: str, route: str, methods: str, calls: int, backend: str,
              status: int, outcome: str, duration_ms: float, attempts: int) -> None:
        message = (f"{request_id} {client} POST {route} {methods} -> {backend} {status} {outcome} "
                   f"{duration_ms:.1f}ms attempts={attempts}")
        if self._json:
            line = json.dumps({
                "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
                "level": "info", "namespace": "sentinel_proxy.access", "message": message,
                "request_id": request_id, "client": client, "route": route, "methods": methods, "calls": calls,
                "backend": backend, "status": status, "outcome": outcome, "duration_ms": duration_ms,
                "attempts": attempts})
        else:
            line = f"{self._prefix(now)} [sentinel_proxy.access#info] {message}"
        self._lines.append(line)
        if len(self._lines) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
