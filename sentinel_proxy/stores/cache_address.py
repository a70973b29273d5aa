"""Where a Redis cache lives: ``redis://`` URLs, parsed without importing any Redis client.

Kept apart from :mod:`sentinel_proxy.stores.cache` because importing txredisapi installs the default
reactor, and configuration is validated before the reactor may be chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __str__(self) -> str:
        """The address for logs, without credentials."""
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``; raise ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"{url!r} is not a redis:// URL")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdecimal()):
        raise ValueError(f"{url!r}: the path must be a database number")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: query and fragment are not supported")
    return RedisAddress(
        host=parts.hostname or "localhost",
        port=port,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )
