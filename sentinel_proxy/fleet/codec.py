"""The pool's snapshot as JSON, for other gateways to apply: what the checks decided, per node.

Nodes travel by :func:`node_id`, a hash of their URL, never by the URL: a URL may hold the node's
credentials, and they stay out of Redis. The decisions are dataclasses (verdicts, divergences,
the agreement); each travels tagged with its class name, from a closed list, so a reader builds
only those. A document carries :data:`VERSION`: a reader refuses any other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any

from sentinel_proxy.core.agreement import Agreement, Contest, Divergence, Majority
from sentinel_proxy.core.integrity import EpochFinding, IntegrityVerdict
from sentinel_proxy.state.backends import BackendPool, LatencyWindow, TipsReport

VERSION = 1
_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (
    Agreement, Contest, Divergence, Majority, EpochFinding, IntegrityVerdict, TipsReport)}


class SnapshotError(ValueError):
    """A document this gateway cannot apply (another version, an unknown type, not JSON)."""


def node_id(url: str) -> str:
    """A stable name for a node across gateways that reveals nothing of its URL."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def fleet_id(urls: list[str]) -> str:
    """One fleet's key prefix part: gateways with other node lists do not mix on one Redis."""
    return hashlib.sha256("\n".join(sorted(urls)).encode()).hexdigest()[:16]


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, LatencyWindow):
        return {"$latency": value.samples}
    if is_dataclass(value) and not isinstance(value, type):
        return {"$": type(value).__name__, **{f.name: _encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item) for key, item in value.items()}
        return {"$dict": [[_encode(key), _encode(item)] for key, item in value.items()]}
    if hasattr(value, "items"):  # a Mapping (Agreement.diverged)
        return _encode(dict(value.items()))
    raise SnapshotError(f"cannot share a {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "$" in value:
        cls = _CLASSES.get(value["$"])
        if cls is None:
            raise SnapshotError(f"unknown type {value['$']!r}")
        return cls(**{key: _decode(item) for key, item in value.items() if key != "$"})
    if "$tuple" in value:
        return tuple(_decode(item) for item in value["$tuple"])
    if "$dict" in value:
        return {_hashable(_decode(key)): _decode(item) for key, item in value["$dict"]}
    if "$latency" in value:
        window = LatencyWindow()
        for sample in value["$latency"]:
            window.add(float(sample))
        return window
    return {key: _decode(item) for key, item in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def encode(pool: BackendPool) -> bytes:
    """The pool's snapshot as a JSON document, nodes by :func:`node_id`."""
    snapshot = pool.snapshot()
    document = {"v": VERSION, "finalized": snapshot["finalized"], "agreement": _encode(snapshot["agreement"]),
                "backends": {node_id(url): _encode(state) for url, state in snapshot["backends"].items()}}
    return json.dumps(document, separators=(",", ":")).encode()


def decode(blob: bytes, pool: BackendPool) -> dict[str, Any]:
    """A snapshot for :meth:`BackendPool.apply` from :func:`encode`'s document: nodes this gateway
    does not have are left out."""
    try:
        document = json.loads(blob)
    except ValueError as exc:
        raise SnapshotError(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("v") != VERSION:
        raise SnapshotError(f"version {document.get('v') if isinstance(document, dict) else None!r}, "
                            f"not {VERSION}")
    try:
        urls = {node_id(b.url): b.url for b in pool.backends}
        backends = {urls[key]: _decode(state) for key, state in document["backends"].items() if key in urls}
        return {"finalized": document["finalized"], "agreement": _decode(document["agreement"]),
                "backends": backends}
    except (KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"malformed ({exc!r})") from None
