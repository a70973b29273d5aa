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
from types import TracebackType
from typing import IO, Any

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                            formatEvent, globalLogPublisher)
from twisted.python.failure import Failure
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])
_log = Logger(observer=observer)

_PLAIN = (str, int, float, bool, type(None))


def escaped(text: str, limit: int = 256) -> str:
    """``text`` safe for one log line: control characters (``\\n``, ``\\r``, ESC...) and lone
    surrogates written as escapes, so a caller's method name or id can neither start a line of
    its own nor break the write; at most ``limit`` characters. Printable text costs one check."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def _write_lines(stream: IO[str], text: str) -> None:
    """Write, falling back to ASCII escapes when the stream cannot encode the text."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        stream.write(text.encode("ascii", "backslashreplace").decode("ascii"))
    stream.flush()


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
        # ASCII JSON: control characters and lone surrogates in any field (a caller's method name)
        # are escapes, so every event stays one line and every line can be written.
        _write_lines(self._stream, json.dumps(record, default=str) + "\n")


def log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    """``sys.excepthook`` under ``LOG_FORMAT=json``: an exception nothing caught (a start-up failure
    twistd lets through) is one event with its traceback, not a record per line of stderr."""
    _log.failure("uncaught exception: {exception}", Failure(value, kind, traceback), exception=repr(value))


def json_observer(stream: IO[str] | None = None) -> FilteringLogObserver:
    """The JSON-lines observer; for the daemon's own stdout (no ``stream``), uncaught exceptions
    go to it too (:func:`log_uncaught`)."""
    if stream is None:
        sys.excepthook = log_uncaught
    return FilteringLogObserver(JsonLinesObserver(stream or sys.stdout), [_predicate])


def methods_summary(methods: tuple[str, ...], shown: int = 3, empty: str = "-") -> str:
    """The first ``shown`` names, each cut to 64 characters (names come from callers), and how
    many more. The usual short names cost one join."""
    if not methods:
        return empty
    text = ",".join(methods[:shown])
    if len(text) > 64:
        text = ",".join([name if len(name) <= 64 else name[:64] + "..." for name in methods[:shown]])
    return text if len(methods) <= shown else f"{text},+{len(methods) - shown}"


def methods_list(methods: tuple[str, ...], shown: int = 10) -> list[str]:
    """The first ``shown`` names for a JSON line, each cut to 64 characters; ``calls`` says how many there were."""
    return [name if len(name) <= 64 else name[:64] + "..." for name in methods[:shown]]


class AccessLog:
    """One line per proxied request, written by our own code to stdout in batches.

    Through twisted.logger each line cost ~50 µs (an event, its formatting, a write and a flush
    per line: 12 % of a request, profiled with py-spy); here a request leaves one tuple of its
    fields, and the lines are formatted (one f-string, or one ``json.dumps``, each) and written
    together every ``FLUSH_INTERVAL`` seconds (and when ``FLUSH_LINES`` wait), in the same shape as
    the rest of the log. Formatted together, in one loop, the lines cost the gateway ~1 µs a
    request live, against ~7.7 µs formatted one at a time between requests (docs/performance.md):
    in between, the rest of the request and the kernel push the formatting code out of the caches.

    What callers choose (request id, forwarded address, method names) is :func:`escaped` in text
    lines and ASCII-escaped in JSON lines; method names are bounded in both (:func:`methods_summary`,
    :func:`methods_list`). A write that fails is logged with the number of lines it lost, and the
    next flush goes on: the flush loop never stops.
    """

    FLUSH_INTERVAL = 0.2
    #: A text line this long or shorter, all printable, is written as it is; a longer one, or one
    #: with a control character or a lone surrogate, has each field escaped and cut (``escaped``).
    PLAIN_LINE = 512
    FLUSH_LINES = 512

    def __init__(self, stream: IO[str], json_lines: bool):
        self._stream = stream
        self._json = json_lines
        #: What :meth:`write` was given, one tuple a request, until the next :meth:`flush`.
        self._pending: list[tuple[Any, ...]] = []
        self._second = -1
        self._stamp = ""

    def _prefix(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")
        return self._stamp

    def write(self, now: float, request_id: str, client: str, route: str, methods: tuple[str, ...], backend: str,
              status: int, outcome: str, duration_ms: float, attempts: int, refused: tuple[str, ...] = (),
              cache: str = "none", upstream_ms: float | None = None, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """``refused``: the methods of the batch items the gateway refused itself; ``cache``: hit,
        partial, miss or none; ``upstream_ms``: the answering node's time (None: no node answered);
        ``bytes_in``/``bytes_out``: the caller's request body and the reply body."""
        pending = self._pending
        pending.append((now, request_id, client, route, methods, backend, status, outcome, duration_ms, attempts,
                        refused, cache, upstream_ms, bytes_in, bytes_out))
        if len(pending) >= self.FLUSH_LINES:
            self.flush()

    def _line(self, now: float, request_id: str, client: str, route: str, methods: tuple[str, ...], backend: str,
              status: int, outcome: str, duration_ms: float, attempts: int, refused: tuple[str, ...], cache: str,
              upstream_ms: float | None, bytes_in: int, bytes_out: int) -> str:
        summary = methods_summary(methods)
        refused_summary = methods_summary(refused) if refused else ""
        upstream = "-" if upstream_ms is None else f"{upstream_ms:.1f}ms"
        if self._json:
            return json.dumps({
                "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
                "level": "info", "namespace": "sentinel_proxy.access",
                "message": self._message(request_id, client, route, summary, backend, status, outcome, duration_ms,
                                         attempts, cache, upstream, bytes_in, bytes_out, refused_summary),
                "request_id": request_id, "client": client, "route": route, "methods": methods_list(methods),
                "calls": len(methods), "refused": methods_list(refused), "refused_calls": len(refused),
                "backend": backend, "status": status, "outcome": outcome, "duration_ms": duration_ms,
                "attempts": attempts, "cache": cache,
                "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
                "bytes_in": bytes_in, "bytes_out": bytes_out})
        message = self._message(request_id, client, route, summary, backend, status, outcome, duration_ms, attempts,
                                cache, upstream, bytes_in, bytes_out, refused_summary)
        if len(message) > self.PLAIN_LINE or not message.isprintable():  # one check for the usual line
            message = self._message(escaped(request_id), escaped(client), escaped(route), escaped(summary),
                                    escaped(backend), status, outcome, duration_ms, attempts, cache, upstream,
                                    bytes_in, bytes_out, escaped(refused_summary))
        return f"{self._prefix(now)} [sentinel_proxy.access#info] {message}"

    @staticmethod
    def _message(request_id: str, client: str, route: str, methods: str, backend: str, status: int, outcome: str,
                 duration_ms: float, attempts: int, cache: str, upstream: str, bytes_in: int, bytes_out: int,
                 refused: str) -> str:
        message = (f"{request_id} {client} POST {route} {methods} -> {backend} {status} {outcome} "
                   f"{duration_ms:.1f}ms attempts={attempts} cache={cache} upstream={upstream} "
                   f"in={bytes_in} out={bytes_out}")
        return f"{message} refused={refused}" if refused else message

    def flush(self) -> None:
        """Write what is buffered; never raises (it runs in a TimerService, which a raise would stop)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        line = self._line
        lines = []
        for fields in pending:
            try:
                lines.append(line(*fields))
            except Exception:  # one request's line, not the batch, is lost
                _log.failure("the access log could not format the line of request {request_id}",
                             request_id=escaped(str(fields[1])))
        if not lines:
            return
        try:
            _write_lines(self._stream, "\n".join(lines) + "\n")
        except Exception:
            _log.failure("the access log could not write {count} line(s); they are lost", count=len(lines))
