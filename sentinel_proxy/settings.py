"""The settings table: every setting's variable, default, parser, help, and whether a reload
applies it or it is a secret, as one dataclass field each.

The Go prototype's variable names and defaults are a compatibility contract (operators already have
its ``.env`` files), so every prototype variable keeps its name, default and meaning. Unlike the
prototype, a bad value is refused with a message that names the setting and the value, instead of
silently becoming 0.

The table *is* the :class:`Settings` dataclass: a field's type is the value it holds, its metadata
the rest of its row. Everything else (``SPECS``, the ``twistd`` options, ``RELOADABLE``,
``SECRET_SETTINGS``) is derived from it, so a setting is added, or made reloadable, in one place;
the fields stay visible to type checkers, which a class built at run time would not be.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
UPSTREAM_CLIENTS = ("fast", "treq")
TRACING_EXPORTS = ("off", "otlp")
MAX_WORKERS = 64


@dataclass(frozen=True)
class Spec:
    """How one setting is named, defaulted, parsed, documented, reloaded and shown."""

    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    #: A SIGHUP applies it to the running gateway; the others take a restart.
    reload: bool = False
    #: Its value is a credential: shown as "***" (set) or "" (unset), never logged.
    secret: bool = False
    #: The :class:`Settings` field; filled in from the field's name.
    field: str = ""

    @property
    def option(self) -> str:
        """CLI option name: the variable in lowercase with dashes, minus the SENTINEL_/PROXY_ prefix."""
        name = self.env
        for prefix in ("SENTINEL_", "PROXY_"):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return name.lower().replace("_", "-")


_SPEC = "sentinel_proxy.spec"


def setting(env: str, default: str | None, parse: Callable[[str], Any], *, reload: bool = False,
            secret: bool = False, help: str) -> Any:
    """One row of the table. No dataclass default: :func:`~sentinel_proxy.config.load_settings`
    gives every field its value, so a row it forgot is an error, not a silent default."""
    return field(metadata={_SPEC: Spec(env, default, parse, help, reload, secret)})


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip()
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"{raw!r} is below the minimum of {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{raw!r} is above the maximum of {maximum}")
        return value

    return parse


def core_count() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows),
    else every core the system has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _workers(raw: str) -> int:
    """``auto``: one process per core (at most 64); else a number of processes from 1 to 64."""
    if raw.strip().lower() == "auto":
        return min(MAX_WORKERS, core_count())
    try:
        return _integer(1, MAX_WORKERS)(raw)
    except ValueError as exc:
        raise ValueError(f"{exc} (or use auto: one per core)") from None


def _one_of(choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """A word from ``choices``, in any case (``aliases`` maps other spellings onto them)."""
    def parse(raw: str) -> str:
        text = raw.strip().lower()
        text = (aliases or {}).get(text, text)
        if text not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _switch(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{raw!r} is not on or off")


def _redis_or(words: tuple[str, ...], off: str | None = None) -> Callable[[str], str]:
    """One of ``words`` (any case), or a redis:// URL, checked here so a typo stops the start, not
    the first call. ``off``: what the word "off" (or nothing) gives, when it is not kept as is."""
    shown = ", ".join(words)

    def parse(raw: str) -> str:
        text = raw.strip()
        word = text.lower()
        if off is not None and word in ("", "off"):
            return off
        if word in words:
            return word
        from sentinel_proxy.stores.cache_address import parse_redis_url

        try:
            parse_redis_url(text)
        except ValueError as exc:
            raise ValueError(f"{raw!r} is not {shown} or a redis:// URL ({exc})") from None
        return text

    return parse


#: CACHE and RATE_LIMIT: where the cache or the rate limiter keeps its state.
_store = _redis_or(("off", "memory"))
#: SHARED_STATE: "" (off), or the Redis the gateways of one fleet share their node state through.
_shared_state = _redis_or(("off",), off="")


_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9]*_(\*|[A-Za-z0-9_]+)\Z")


def _methods(raw: str) -> tuple[str, ...]:
    """Comma-separated method names (``node_getBlock``) or namespaces (``p2p_*``)."""
    patterns = tuple(item.strip() for item in raw.split(",") if item.strip())
    for pattern in patterns:
        if not _PATTERN.match(pattern):
            raise ValueError(f"{pattern!r} is not a method name or a namespace pattern such as node_*")
    return patterns


def _token(raw: str) -> str:
    token = raw.strip()
    if token and len(token) < 16:
        raise ValueError("is shorter than 16 characters (use a long random token, e.g. openssl rand -hex 32)")
    return token


def _proxies(raw: str) -> tuple[Any, ...]:
    from sentinel_proxy.stores.ratelimit import parse_trusted_proxies  # imports no reactor

    return parse_trusted_proxies(raw)


def _keys(raw: str) -> tuple[str, ...]:
    keys = tuple(item.strip() for item in raw.split(",") if item.strip())
    for key in keys:
        if len(key) < 16 or not key.isascii() or not key.isprintable():
            raise ValueError("an API key is shorter than 16 characters or not printable ASCII (value not shown)")
    return keys


def parse_backend_url(raw: str) -> str:
    """Check one backend URL; the URL is kept as written so /health shows what the operator set."""
    url = raw.strip()
    if not url.isascii():
        raise ValueError(f"{raw!r} is not ASCII (write an international host name in punycode)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{raw!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{raw!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{raw!r} has no host")
    if port == 0:
        raise ValueError(f"{raw!r} has port 0")
    if parts.query or parts.fragment:
        raise ValueError(f"{raw!r} must not carry a query or fragment")
    return url


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def _backend_entry(item: str) -> tuple[str, str]:
    """``url`` or ``name=url``: the name labels the node in headers, logs and the dashboard."""
    text = item.strip()
    scheme_at = text.find("://")
    equals_at = text.find("=")
    if 0 <= equals_at < scheme_at:
        name, url = text[:equals_at].strip(), text[equals_at + 1:]
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a node name (letters, digits, '.', '_', '-'; at most 64)")
        return name, parse_backend_url(url)
    return "", parse_backend_url(text)


def _backends(raw: str) -> tuple[tuple[str, str], ...]:
    entries = tuple(_backend_entry(item) for item in raw.split(",") if item.strip())
    if not entries:
        raise ValueError("no backend URL given")
    urls = [url for _, url in entries]
    duplicates = sorted({u for u in urls if urls.count(u) > 1})
    if duplicates:
        raise ValueError(f"{duplicates[0]!r} is listed twice")
    names = [name for name, _ in entries if name]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"node name {duplicates[0]!r} is used twice")
    return entries


def _endpoints(raw: str) -> tuple[str, ...]:
    """Twisted endpoint strings separated by whitespace: they contain ``:`` and may contain ``,``
    (a TLS cipher list), never a blank. Only their shape is checked here; whether Twisted can
    build each one (and load its TLS files) is checked with the whole configuration."""
    descriptions = tuple(raw.split())
    if not descriptions:
        raise ValueError("no endpoint given")
    for description in descriptions:
        if ":" not in description:
            raise ValueError(f"{description!r} is not a Twisted endpoint string such as tcp:8080")
    duplicates = sorted({d for d in descriptions if descriptions.count(d) > 1})
    if duplicates:
        raise ValueError(f"{duplicates[0]!r} is listed twice")
    return descriptions


@dataclass(frozen=True)
class Settings:
    """Validated configuration, built only by :func:`~sentinel_proxy.config.load_settings`.

    One field per setting, in the order of ``--help`` and ``/admin/config``.
    """

    port: int = setting("PROXY_PORT", "8080", _integer(0, 65535), help="listen port")
    listen: tuple[str, ...] = setting("PROXY_LISTEN", None, _endpoints,
        help="Twisted endpoint strings to listen on, separated by spaces (--listen: once per endpoint), "
             "e.g. tcp:8080 or ssl:8443:privateKey=key.pem:certKey=cert.pem (default tcp:$PROXY_PORT)")
    workers: int = setting("WORKERS", "1", _workers,
        help="processes serving the port together (SO_REUSEPORT), 1 to 64, or auto: one per core (recommended "
             "in production); the first runs the checks for all")
    log_level: str = setting("LOG_LEVEL", "info", _one_of(LOG_LEVELS, {"warning": "warn"}), reload=True, help="debug, info, warn or error")
    log_format: str = setting("LOG_FORMAT", "text", _one_of(LOG_FORMATS),
        help="text (twistd's log) or json (one JSON object per line on stdout, for log shippers)")
    access_log: bool = setting("ACCESS_LOG", "on", _switch, reload=True,
        help="one log line per proxied request: on or off")
    backends: tuple[tuple[str, str], ...] = setting("SENTINEL_BACKENDS", None, _backends, reload=True,
        help="comma-separated Aztec node URLs, each optionally named as name=URL (required unless --demo)")
    request_timeout_ms: int = setting("REQUEST_TIMEOUT_MS", "30000", _integer(1), reload=True,
        help="overall deadline of a proxied request (all attempts) and of each check call, in ms")
    connect_timeout_ms: int = setting("CONNECT_TIMEOUT_MS", "2000", _integer(1),
        help="deadline to open a connection to a node, in ms (a refused or silent port fails over fast)")
    attempt_timeout_ms: int = setting("ATTEMPT_TIMEOUT_MS", "10000", _integer(1), reload=True,
        help="deadline of one attempt at one node, in ms: a node that accepts and never answers costs at "
             "most this")
    max_attempts: int = setting("MAX_ATTEMPTS", "3", _integer(1), reload=True,
        help="nodes tried per request (failover), never the same node twice, within REQUEST_TIMEOUT_MS")
    hedge: bool = setting("HEDGE", "off", _switch, reload=True,
        help="hedged reads: if the first node is slow, ask a second one and take the first good answer")
    hedge_delay_ms: int = setting("HEDGE_DELAY_MS", "0", _integer(0), reload=True,
        help="when to send the hedge, in ms; 0 = adaptive, the fastest node's p95 latency")
    breaker_consecutive_failures: int = setting("BREAKER_CONSECUTIVE_FAILURES", "5", _integer(1), reload=True,
        help="failures in a row that open a node's circuit breaker")
    breaker_window: int = setting("BREAKER_WINDOW", "80", _integer(1), reload=True,
        help="calls in the breaker's sliding window")
    breaker_window_failures: int = setting("BREAKER_WINDOW_FAILURES", "20", _integer(1), reload=True,
        help="failures within the window that open the breaker")
    breaker_cooldown_ms: int = setting("BREAKER_COOLDOWN_MS", "5000", _integer(1), reload=True,
        help="how long an open breaker keeps a node out before probing it, in ms")
    breaker_close_successes: int = setting("BREAKER_CLOSE_SUCCESSES", "8", _integer(1), reload=True,
        help="successful probes in a row that close the breaker again")
    method_allow: tuple[str, ...] = setting("METHOD_ALLOW", "node_*,aztec_*,p2p_*", _methods, reload=True,
        help="methods forwarded: names or namespaces (ns_*); the admin and debug namespaces (nodeAdmin_*, "
             "aztecAdmin_*, nodeDebug_*, aztecDebug_*, in any case) are never forwarded whatever this says")
    method_deny: tuple[str, ...] = setting("METHOD_DENY", "", _methods, reload=True,
        help="methods refused even when allowed (deny wins)")
    archiver_method_allow: tuple[str, ...] = setting("ARCHIVER_METHOD_ALLOW", "", _methods, reload=True,
        help="a narrower allow list for /archiver (empty: METHOD_ALLOW)")
    pruned_method_allow: tuple[str, ...] = setting("PRUNED_METHOD_ALLOW", "", _methods, reload=True,
        help="a narrower allow list for /pruned (empty: METHOD_ALLOW)")
    admin_token: str = setting("ADMIN_TOKEN", "", _token, reload=True, secret=True,
        help="bearer token of the /admin endpoints (drain, checks, config); admin is disabled when unset")
    protect_status: bool = setting("PROTECT_STATUS", "off", _switch, reload=True,
        help="on: /health and /dashboard also need the admin token (/ready stays open; /metrics: PROTECT_METRICS)")
    protect_metrics: bool = setting("PROTECT_METRICS", "off", _switch, reload=True,
        help="on: /metrics needs the admin token or METRICS_TOKEN (a scraper's own bearer token; one of the two "
             "must be set)")
    metrics_token: str = setting("METRICS_TOKEN", "", _token, reload=True, secret=True,
        help="bearer token that opens /metrics only (setting it protects /metrics whatever PROTECT_METRICS says)")
    rate_limit: str = setting("RATE_LIMIT", "off", _store,
        help="per-client rate limiting: off, memory (one process: refused with WORKERS > 1), or "
             "redis://host:port/db (one limit shared by several workers and gateways)")
    rate_limit_rate: int = setting("RATE_LIMIT_RATE", "20", _integer(1), reload=True,
        help="tokens per second per client address")
    rate_limit_burst: int = setting("RATE_LIMIT_BURST", "200", _integer(1), reload=True,
        help="bucket size per client address")
    trusted_proxies: tuple[Any, ...] = setting("TRUSTED_PROXIES", "", _proxies, reload=True,
        help="IPs/CIDRs of the proxies in front of the gateway, whose X-Forwarded-For is believed")
    api_keys: tuple[str, ...] = setting("API_KEYS", "", _keys, reload=True, secret=True,
        help="API keys (X-API-Key header or ?key=) with their own, higher limits; never logged")
    api_key_rate: int = setting("API_KEY_RATE", "200", _integer(1), reload=True,
        help="tokens per second per API key")
    api_key_burst: int = setting("API_KEY_BURST", "2000", _integer(1), reload=True, help="bucket size per API key")
    shared_state: str = setting("SHARED_STATE", "off", _shared_state,
        help="redis://host:port/db shared by every gateway of a fleet (and their workers): node verdicts, "
             "drains, breaker openings and the finalized tip, with one prober per fleet holding a lease; "
             "off: each gateway checks the nodes itself")
    cache: str = setting("CACHE", "memory", _store,
        help="response cache: off, memory, or redis://host:port/db (shared by several gateways)")
    cache_size_mb: int = setting("CACHE_SIZE_MB", "64", _integer(1), help="size of the in-memory cache, in MB")
    cache_volatile_ttl_ms: int = setting("CACHE_VOLATILE_TTL_MS", "1000", _integer(0),
        help="how long volatile answers (tips, block number, fees) are kept, in ms; below one block time")
    redis_timeout_ms: int = setting("REDIS_TIMEOUT_MS", "100", _integer(1),
        help="deadline of every Redis call, in ms: a slow or absent Redis is a cache miss, never an error")
    error_budget_percent: int = setting("ERROR_BUDGET_PERCENT", "5", _integer(1, 100), reload=True,
        help="share of requests that may fail at the nodes (502, timeout) before SentinelHighErrorRate fires, in "
             "percent; exported as sentinel_proxy_error_budget_ratio, which the alert rule compares against")
    max_in_flight: int = setting("MAX_IN_FLIGHT", "1024", _integer(1), reload=True,
        help="requests handled at once; beyond it callers get a fast 503 with Retry-After instead of a queue")
    max_response_bytes: int = setting("MAX_RESPONSE_BYTES", "33554432", _integer(1),
        help="largest answer accepted from a node, in bytes; a larger one is cut off and the caller gets a 502")
    max_buffered_answers_mb: int = setting("MAX_BUFFERED_ANSWERS_MB", "64", _integer(1),
        help="node answers held in memory at once per process, in MB (from their first byte until handed to "
             "the caller's connection); past it new requests get a fast 503 with Retry-After instead of more "
             "memory. 64: a worker idles at ~60 MB and stays under ~90 MB with the default cache under a mixed "
             "read load, where answers are small; 64 MB of big answers at once is two of MAX_RESPONSE_BYTES "
             "(docs/configuration.md, Memory)")
    client_idle_timeout_ms: int = setting("CLIENT_IDLE_TIMEOUT_MS", "60000", _integer(1),
        help="a client connection that sends nothing for this long is closed, in ms")
    client_header_timeout_ms: int = setting("CLIENT_HEADER_TIMEOUT_MS", "10000", _integer(1), reload=True,
        help="a request's line and headers must arrive in full within this, in ms, counted from its first byte "
             "(a client dripping bytes is cut off; the idle timeout does not restart on each byte)")
    client_body_timeout_ms: int = setting("CLIENT_BODY_TIMEOUT_MS", "30000", _integer(1), reload=True,
        help="a request's body must arrive in full within this, in ms, counted from the end of its headers")
    max_connections: int = setting("MAX_CONNECTIONS", "4096", _integer(1), reload=True,
        help="caller connections held at once per process; past it new ones are closed at once (kept below "
             "the open-files limit, so the gateway keeps descriptors for its nodes and checks)")
    max_connections_per_client: int = setting("MAX_CONNECTIONS_PER_CLIENT", "256", _integer(1), reload=True,
        help="caller connections held at once per client address, per process")
    drain_delay_ms: int = setting("DRAIN_DELAY_MS", "3000", _integer(0),
        help="on SIGTERM, how long the gateway keeps accepting and serving, with /ready at 503, before it "
             "closes its listener: time for load balancers to stop sending, in ms")
    shutdown_grace_ms: int = setting("SHUTDOWN_GRACE_MS", "10000", _integer(0),
        help="on SIGTERM, after DRAIN_DELAY_MS, how long requests in flight may take to finish, in ms")
    health_check_interval_ms: int = setting("HEALTH_CHECK_INTERVAL_MS", "30000", _integer(1), reload=True,
        help="readiness check interval, in ms")
    health_check_timeout_ms: int = setting("HEALTH_CHECK_TIMEOUT_MS", "5000", _integer(1), reload=True,
        help="each node's health check must finish within this, in ms, on its own clock: a hung node delays "
             "no other node's verdict")
    integrity_check_interval_ms: int = setting("INTEGRITY_CHECK_INTERVAL_MS", "60000", _integer(1), reload=True,
        help="integrity check interval, in ms")
    integrity_check_epochs: int = setting("INTEGRITY_CHECK_EPOCHS", "10", _integer(1), reload=True,
        help="recent epochs analysed by the integrity check")
    integrity_score_threshold: int = setting("INTEGRITY_SCORE_THRESHOLD", "95", _integer(0, 100), reload=True,
        help="integrity score at or below which a node is 'bad'")
    slots_per_epoch: int = setting("SLOTS_PER_EPOCH", "32", _integer(1), reload=True, help="slots per epoch")
    expected_validators: int = setting("EXPECTED_VALIDATORS", "24", _integer(1), reload=True,
        help="committee size per epoch (48 on Aztec 4.x networks)")
    archiver_threshold_epochs: int = setting("ARCHIVER_THRESHOLD_EPOCHS", "100", _integer(0), reload=True,
        help="a node with more epochs of history than this is an 'archiver'")
    max_block_lag: int = setting("MAX_BLOCK_LAG", "10", _integer(0), reload=True,
        help="a node more blocks than this behind the best healthy node gets no traffic until it catches up")
    max_batch_size: int = setting("MAX_BATCH_SIZE", "100", _integer(1), reload=True,
        help="most calls accepted in one JSON-RPC batch (a real node's limit is 100)")
    max_body_bytes: int = setting("MAX_BODY_BYTES", "1048576", _integer(1),
        help="largest request body accepted, in bytes (a real node's limit is 1 MB)")
    upstream_max_connections: int = setting("UPSTREAM_MAX_CONNECTIONS", "128", _integer(1),
        help="persistent connections kept per node")
    upstream_idle_timeout_ms: int = setting("UPSTREAM_IDLE_TIMEOUT_MS", "4000", _integer(1),
        help="idle pooled connections are closed after this, in ms; keep it below the node's keep-alive timeout "
             "(5 s on Node.js) so a request never lands on a closing socket")
    upstream_client: str = setting("UPSTREAM_CLIENT", "fast", _one_of(UPSTREAM_CLIENTS),
        help="the forwarding client: fast (the gateway's own HTTP/1.1 client, answers passed through byte for "
             "byte) or treq (treq's HTTPClient, for measurement only: it gunzips answers)")

    tracing: str = setting("TRACING", "off", _one_of(TRACING_EXPORTS),
        help="OpenTelemetry export of one span per request and per upstream attempt: off, or otlp (to "
             "OTEL_EXPORTER_OTLP_ENDPOINT; needs the otel extra: pip install 'sentinel-proxy[otel]'); "
             "W3C traceparent is passed to nodes either way")

    #: ``--demo``: a flag of ``twistd sentinel-proxy`` only, not a variable; takes a restart.
    demo: bool = False

    @property
    def request_timeout(self) -> float:
        return self.request_timeout_ms / 1000.0


SPECS: tuple[Spec, ...] = tuple(replace(f.metadata[_SPEC], field=f.name) for f in fields(Settings)
                                if _SPEC in f.metadata)
SPECS_BY_FIELD: Mapping[str, Spec] = {spec.field: spec for spec in SPECS}
#: Settings a SIGHUP applies to the running gateway; the rest (listening, log format, pools,
#: body limits, the demo) take a restart, and a reload that changes them says so.
RELOADABLE = frozenset(spec.field for spec in SPECS if spec.reload)
#: Settings whose values are secrets: shown as "***" (set) or "" (unset).
SECRET_SETTINGS = frozenset(spec.field for spec in SPECS if spec.secret)
