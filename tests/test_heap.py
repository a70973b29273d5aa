"""The collector tuning of a daemon's process (ops/heap.py); test_tap checks that makeService applies it."""
from __future__ import annotations

import gc

from sentinel_proxy.ops import heap


def test_settle_freezes_start_up_and_collects_the_young_less_often(collector):
    _, middle, old = gc.get_threshold()
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    heap.settle()
    assert gc.get_freeze_count() > 0, "start-up's objects are out of the collector's sight"
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, middle, old)
    assert heap.YOUNG_THRESHOLD > 700, "less often than CPython's default"


def test_a_cycle_made_after_settle_is_still_collected(collector):
    heap.settle()

    class Node:
        pass

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2

