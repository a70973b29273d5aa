"""Settings: the one place where defaults, ``.env``, the environment and CLI options meet.

The Go prototype's variable names and defaults are a compatibility contract (operators already have
its ``.env`` files), so every prototype variable keeps its name, default and meaning. Unlike the
prototype, a bad value is refused with a message that names the setting and the value, instead of
silently becoming 0.

Precedence, lowest to highest: built-in default, profile default (``--demo``), ``.env`` file in the
working directory, process environment, ``twistd sentinel-proxy`` option.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting has a value we refuse to start with; the message is one line for the operator."""


@dataclass(frozen=True)
class Spec:
    """How one setting is named, defaulted, parsed and documented."""

    field: str
    env: str
    default: str | None
    parse: Callable[[str], object]
    help: str

    @property
    def option(self) -> str:
        """CLI option name: the variable in lowercase with dashes, minus the SENTINEL_/PROXY_ prefix."""
        name = self.env
        for prefix in ("SENTINEL_", "PROXY_"):
            if name.startswith(prefix):
                name = name[len(prefix):]
        return name.lower().replace("_", "-")


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


def _log_level(raw: str) -> str:
    level = raw.strip().lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ValueError(f"{raw!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _switch(raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{raw!r} is not on or off")


def _log_format(raw: str) -> str:
    text = raw.strip().lower()
    if text not in LOG_FORMATS:
        raise ValueError(f"{raw!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


def _store(raw: str) -> str:
    """off, memory, or a redis:// URL (checked here, so a typo stops the start, not the first call):
    where the cache or the rate limiter keeps its state."""
    text = raw.strip()
    if text.lower() in ("off", "memory"):
        return text.lower()
    from sentinel_proxy.stores.cache_address import parse_redis_url

    try:
        parse_redis_url(text)
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not off, memory or a redis:// URL ({exc})") from None
    return text


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


def _endpoint(raw: str) -> str:
    text = raw.strip()
    if ":" not in text:
        raise ValueError(f"{raw!r} is not a Twisted endpoint string such as tcp:8080")
    return text


SPECS: tuple[Spec, ...] = (
    Spec("port", "PROXY_PORT", "8080", _integer(0, 65535), "listen port"),
    Spec("listen", "PROXY_LISTEN", None, _endpoint,
         "Twisted endpoint string to listen on (default tcp:$PROXY_PORT)"),
    Spec("workers", "WORKERS", "1", _integer(1, 64),
         "processes serving the port together (SO_REUSEPORT); the first runs the checks for all"),
    Spec("log_level", "LOG_LEVEL", "info", _log_level, "debug, info, warn or error"),
    Spec("log_format", "LOG_FORMAT", "text", _log_format,
         "text (twistd's log) or json (one JSON object per line on stdout, for log shippers)"),
    Spec("access_log", "ACCESS_LOG", "on", _switch, "one log line per proxied request: on or off"),
    Spec("backends", "SENTINEL_BACKENDS", None, _backends,
         "comma-separated Aztec node URLs, each optionally named as name=URL (required unless --demo)"),
    Spec("request_timeout_ms", "REQUEST_TIMEOUT_MS", "30000", _integer(1),
         "overall deadline of a proxied request (all attempts) and of each check call, in ms"),
    Spec("connect_timeout_ms", "CONNECT_TIMEOUT_MS", "2000", _integer(1),
         "deadline to open a connection to a node, in ms (a refused or silent port fails over fast)"),
    Spec("attempt_timeout_ms", "ATTEMPT_TIMEOUT_MS", "10000", _integer(1),
         "deadline of one attempt at one node, in ms: a node that accepts and never answers costs at most this"),
    Spec("max_attempts", "MAX_ATTEMPTS", "3", _integer(1),
         "nodes tried per request (failover), never the same node twice, within REQUEST_TIMEOUT_MS"),
    Spec("hedge", "HEDGE", "off", _switch,
         "hedged reads: if the first node is slow, ask a second one and take the first good answer"),
    Spec("hedge_delay_ms", "HEDGE_DELAY_MS", "0", _integer(0),
         "when to send the hedge, in ms; 0 = adaptive, the fastest node's p95 latency"),
    Spec("breaker_consecutive_failures", "BREAKER_CONSECUTIVE_FAILURES", "5", _integer(1),
         "failures in a row that open a node's circuit breaker"),
    Spec("breaker_window", "BREAKER_WINDOW", "80", _integer(1), "calls in the breaker's sliding window"),
    Spec("breaker_window_failures", "BREAKER_WINDOW_FAILURES", "20", _integer(1),
         "failures within the window that open the breaker"),
    Spec("breaker_cooldown_ms", "BREAKER_COOLDOWN_MS", "5000", _integer(1),
         "how long an open breaker keeps a node out before probing it, in ms"),
    Spec("breaker_close_successes", "BREAKER_CLOSE_SUCCESSES", "8", _integer(1),
         "successful probes in a row that close the breaker again"),
    Spec("method_allow", "METHOD_ALLOW", "node_*,p2p_*", _methods,
         "methods forwarded: names or namespaces (ns_*); nodeAdmin_* is never forwarded whatever this says"),
    Spec("method_deny", "METHOD_DENY", "", _methods, "methods refused even when allowed (deny wins)"),
    Spec("archiver_method_allow", "ARCHIVER_METHOD_ALLOW", "", _methods,
         "a narrower allow list for /archiver (empty: METHOD_ALLOW)"),
    Spec("pruned_method_allow", "PRUNED_METHOD_ALLOW", "", _methods,
         "a narrower allow list for /pruned (empty: METHOD_ALLOW)"),
    Spec("admin_token", "ADMIN_TOKEN", "", _token,
         "bearer token of the /admin endpoints (drain, checks, config); admin is disabled when unset"),
    Spec("protect_status", "PROTECT_STATUS", "off", _switch,
         "on: /health and /dashboard also need the admin token (/ready and /metrics stay open)"),
    Spec("rate_limit", "RATE_LIMIT", "off", _store,
         "per-client rate limiting: off, memory, or redis://host:port/db (one limit shared by several gateways)"),
    Spec("rate_limit_rate", "RATE_LIMIT_RATE", "20", _integer(1), "tokens per second per client address"),
    Spec("rate_limit_burst", "RATE_LIMIT_BURST", "200", _integer(1), "bucket size per client address"),
    Spec("trusted_proxies", "TRUSTED_PROXIES", "", _proxies,
         "IPs/CIDRs of the proxies in front of the gateway, whose X-Forwarded-For is believed"),
    Spec("api_keys", "API_KEYS", "", _keys,
         "API keys (X-API-Key header or ?key=) with their own, higher limits; never logged"),
    Spec("api_key_rate", "API_KEY_RATE", "200", _integer(1), "tokens per second per API key"),
    Spec("api_key_burst", "API_KEY_BURST", "2000", _integer(1), "bucket size per API key"),
    Spec("cache", "CACHE", "memory", _store,
         "response cache: off, memory, or redis://host:port/db (shared by several gateways)"),
    Spec("cache_size_mb", "CACHE_SIZE_MB", "64", _integer(1), "size of the in-memory cache, in MB"),
    Spec("cache_volatile_ttl_ms", "CACHE_VOLATILE_TTL_MS", "1000", _integer(0),
         "how long volatile answers (tips, block number, fees) are kept, in ms; below one block time"),
    Spec("redis_timeout_ms", "REDIS_TIMEOUT_MS", "100", _integer(1),
         "deadline of every Redis call, in ms: a slow or absent Redis is a cache miss, never an error"),
    Spec("max_in_flight", "MAX_IN_FLIGHT", "1024", _integer(1),
         "requests handled at once; beyond it callers get a fast 503 with Retry-After instead of a queue"),
    Spec("max_response_bytes", "MAX_RESPONSE_BYTES", "33554432", _integer(1),
         "largest answer accepted from a node, in bytes; a larger one is cut off and the caller gets a 502"),
    Spec("client_idle_timeout_ms", "CLIENT_IDLE_TIMEOUT_MS", "60000", _integer(1),
         "a client connection that sends nothing for this long is closed, in ms"),
    Spec("shutdown_grace_ms", "SHUTDOWN_GRACE_MS", "10000", _integer(0),
         "on SIGTERM, how long requests in flight may take to finish, in ms"),
    Spec("health_check_interval_ms", "HEALTH_CHECK_INTERVAL_MS", "30000", _integer(1),
         "readiness check interval, in ms"),
    Spec("integrity_check_interval_ms", "INTEGRITY_CHECK_INTERVAL_MS", "60000", _integer(1),
         "integrity check interval, in ms"),
    Spec("integrity_check_epochs", "INTEGRITY_CHECK_EPOCHS", "10", _integer(1),
         "recent epochs analysed by the integrity check"),
    Spec("integrity_score_threshold", "INTEGRITY_SCORE_THRESHOLD", "95", _integer(0, 100),
         "integrity score at or below which a node is 'bad'"),
    Spec("slots_per_epoch", "SLOTS_PER_EPOCH", "32", _integer(1), "slots per epoch"),
    Spec("expected_validators", "EXPECTED_VALIDATORS", "24", _integer(1),
         "committee size per epoch (48 on Aztec 4.x networks)"),
    Spec("archiver_threshold_epochs", "ARCHIVER_THRESHOLD_EPOCHS", "100", _integer(0),
         "a node with more epochs of history than this is an 'archiver'"),
    Spec("max_block_lag", "MAX_BLOCK_LAG", "10", _integer(0),
         "a node more blocks than this behind the best healthy node gets no traffic until it catches up"),
    Spec("max_batch_size", "MAX_BATCH_SIZE", "100", _integer(1),
         "most calls accepted in one JSON-RPC batch (a real node's limit is 100)"),
    Spec("max_body_bytes", "MAX_BODY_BYTES", "1048576", _integer(1),
         "largest request body accepted, in bytes (a real node's limit is 1 MB)"),
    Spec("upstream_max_connections", "UPSTREAM_MAX_CONNECTIONS", "128", _integer(1),
         "persistent connections kept per node"),
    Spec("upstream_idle_timeout_ms", "UPSTREAM_IDLE_TIMEOUT_MS", "4000", _integer(1),
         "idle pooled connections are closed after this, in ms; keep it below the node's "
         "keep-alive timeout (5 s on Node.js) so a request never lands on a closing socket"),
)

SPECS_BY_FIELD = {spec.field: spec for spec in SPECS}

#: ``--demo`` runs a simulated devnet-sized chain (8 slots per epoch, as Aztec devnet; committee 8)
#: and checks often, so every feature is visible within seconds.
DEMO_DEFAULTS: Mapping[str, str] = {
    "SLOTS_PER_EPOCH": "8",
    "EXPECTED_VALIDATORS": "8",
    "HEALTH_CHECK_INTERVAL_MS": "2000",
    "INTEGRITY_CHECK_INTERVAL_MS": "10000",
}


@dataclass(frozen=True)
class Settings:
    """Validated configuration; built only by :func:`load_settings`."""

    port: int
    listen: str
    workers: int
    log_level: str
    log_format: str
    access_log: bool
    backends: tuple[tuple[str, str], ...]
    request_timeout_ms: int
    connect_timeout_ms: int
    attempt_timeout_ms: int
    max_attempts: int
    hedge: bool
    hedge_delay_ms: int
    breaker_consecutive_failures: int
    breaker_window: int
    breaker_window_failures: int
    breaker_cooldown_ms: int
    breaker_close_successes: int
    method_allow: tuple[str, ...]
    method_deny: tuple[str, ...]
    archiver_method_allow: tuple[str, ...]
    pruned_method_allow: tuple[str, ...]
    admin_token: str
    protect_status: bool
    rate_limit: str
    rate_limit_rate: int
    rate_limit_burst: int
    trusted_proxies: tuple[Any, ...]
    api_keys: tuple[str, ...]
    api_key_rate: int
    api_key_burst: int
    cache: str
    cache_size_mb: int
    cache_volatile_ttl_ms: int
    redis_timeout_ms: int
    max_in_flight: int
    max_response_bytes: int
    client_idle_timeout_ms: int
    shutdown_grace_ms: int
    health_check_interval_ms: int
    integrity_check_interval_ms: int
    integrity_check_epochs: int
    integrity_score_threshold: int
    slots_per_epoch: int
    expected_validators: int
    archiver_threshold_epochs: int
    max_block_lag: int
    max_batch_size: int
    max_body_bytes: int
    upstream_max_connections: int
    upstream_idle_timeout_ms: int
    demo: bool = False

    @property
    def request_timeout(self) -> float:
        return self.request_timeout_ms / 1000.0


def read_dotenv(path: str) -> dict[str, str]:
    """Parse a ``.env`` file the way godotenv does for the common cases the prototype's users have.

    Supports ``KEY=VALUE``, ``export KEY=VALUE``, comments, blank lines and quoted values. A line
    that is none of these is an error rather than silently ignored, since a typo there would
    otherwise start the gateway with a default the operator did not mean.
    """
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[len("export "):].lstrip()
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"{path} line {number}: expected KEY=VALUE, got {line.strip()!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
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

    values: dict[str, object] = {}
    for spec in SPECS:
        raw, origin = spec.default, "default"
        for layer, name in layers:
            if spec.env in layer:
                raw, origin = layer[spec.env], name
        if cli.get(spec.field) is not None:
            raw, origin = cli[spec.field], "option"
        if raw is None:
            values[spec.field] = None
            continue
        try:
            values[spec.field] = spec.parse(raw)
        except ValueError as exc:
            where = f"--{spec.option}" if origin == "option" else f"{spec.env} ({origin})"
            raise ConfigError(f"invalid {where}: {exc}") from None

    if values["backends"] is None:
        if not demo:
            raise ConfigError(
                "SENTINEL_BACKENDS is not set: give the Aztec node URLs, "
                "e.g. --backends http://node1:8080,http://node2:8080 (or run with --demo)")
        values["backends"] = ()
    if values["listen"] is None:
        values["listen"] = f"tcp:{values['port']}"
    if values["workers"] > 1:
        listen = str(values["listen"])
        parts = listen.split(":")
        if parts[0] != "tcp" or len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) == 0:
            raise ConfigError(f"invalid WORKERS: {values['workers']} workers need a fixed TCP port to share, "
                              f"not {listen!r}")
    known = {f.name for f in fields(Settings)}
    return Settings(demo=demo, **{k: v for k, v in values.items() if k in known})
