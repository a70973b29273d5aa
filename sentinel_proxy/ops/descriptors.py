"""Open files: the gateway's own budget of descriptors, so a flood of callers cannot take the ones
its nodes and checks need.

Every caller connection, every pooled connection to a node and every check costs a descriptor.
Run out, and the gateway can neither accept nor reach a node (the failures are then counted as its
own, never a node's: upstream/response.py). Two defences: at start the soft ``RLIMIT_NOFILE`` is
raised to the hard one (as nginx's ``worker_rlimit_nofile`` and most servers do: the soft default
of 1024 is a relic of ``select``, which the reactor does not use), and the caller connection caps
(MAX_CONNECTIONS) are checked against what is left once the nodes' pools have their share: a cap
the limit cannot hold is logged at start, with the numbers to change.
"""
from __future__ import annotations

import resource

from twisted.logger import Logger

from sentinel_proxy.ops.logs import observer

log = Logger(observer=observer)

#: Descriptors kept for everything besides callers and node pools: the listener, the checks'
#: own connections, Redis, log files, the workers' pipes, the Python runtime's own files.
RESERVE = 64


def needed(max_connections: int, nodes: int, per_node: int) -> int:
    """Descriptors the configuration may hold at once: every caller connection it admits, every
    node's full pool, and the reserve."""
    return max_connections + nodes * per_node + RESERVE


def raised(soft: int, hard: int) -> int:
    """The soft limit to run with: the hard limit (an unlimited hard limit leaves the soft one)."""
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return soft
    return hard


def ensure_open_files(max_connections: int, nodes: int, per_node: int) -> int:
    """Raise the soft open-files limit to the hard one; warn when the caps can outrun it. The
    limit in force is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raised(soft, hard)
    if limit != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError) as exc:
            log.warn("could not raise the open-files limit from {soft} to {hard}: {error}", soft=soft, hard=hard,
                     error=str(exc))
            limit = soft
    wanted = needed(max_connections, nodes, per_node)
    if wanted > limit:
        log.warn("the open-files limit ({limit}) is below what the configuration may hold ({wanted}: "
                 "MAX_CONNECTIONS={max_connections} + {nodes} nodes x UPSTREAM_MAX_CONNECTIONS={per_node} + "
                 "{reserve}): lower MAX_CONNECTIONS to {fits} or raise the limit (ulimit -n, LimitNOFILE=, "
                 "docker --ulimit nofile=)", limit=limit, wanted=wanted, max_connections=max_connections,
                 nodes=nodes, per_node=per_node, reserve=RESERVE,
                 fits=max(1, limit - nodes * per_node - RESERVE))
    return limit
