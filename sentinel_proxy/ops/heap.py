"""The cyclic garbage collector, tuned once for a long-lived daemon.

Every request leaves a few short-lived cycles behind (a coroutine and the Deferreds that drive
it), so with CPython's default threshold (a young collection every 700 net allocations) the
collector runs every few requests, and every tenth of those also walks the middle generation.
Measured with ``../shared/bench`` (``batch1``, cache off, pinned): the default costs 4-5 % of the
gateway's CPU per request against a young threshold of 10,000 (docs/performance.md).

The objects of start-up (modules, the service tree, the Prometheus registry: most of the heap)
never die, yet each full collection walks them. ``gc.freeze()`` once everything is built moves
them out of the collector's sight, as large Python servers do (Instagram's write-up of
``gc.freeze``). Cyclic garbage is still collected, a little later; the extra memory it may hold
is a few thousand small objects.
"""
from __future__ import annotations

import gc

#: Net allocations of container objects between young collections (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Freeze what start-up built, and collect the young generation less often. Called once the
    service tree is built (``makeService``); the middle and old thresholds are kept."""
    gc.collect()  # what start-up left as garbage is freed rather than frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
