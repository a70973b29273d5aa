"""The fault matrix (issue 12, item 11): a real gateway daemon in front of three simulated nodes,
a bounded load of 12 callers, and one fault at a time; every outcome the callers saw is counted,
the table is printed at the end, and each fault's promise is asserted.

The faults and their promises live in ``tests/fault_load.py``, shared with ``bench/fault_matrix.py``
(which prints the table kept in docs/failure-handling.md). ``tests/test_resilience.py`` proves the
same node faults in process, against the breaker's own numbers; here the point is what a caller of
the real daemon sees. One gateway serves the faults it survives; the others get their own.
"""
from __future__ import annotations

import pytest

from tests.fault_load import FAULTS, Rig, Row, table
from tests.processes import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(request):
    """The row of every fault run; the table is printed at the end of the module, past the
    output capture (what ``capsys.disabled()`` does, for a module-scoped fixture)."""
    collected: list[Row] = []
    yield collected
    if collected:
        with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            print("\n" + table(collected))


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """One fleet and one shared gateway for the module, stopped at its end."""
    started = Rig(tmp_path_factory.mktemp("fault-matrix"))
    yield started
    started.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(rig, rows, fault, request):
    if fault == "redis-killed":
        redis: RedisServer = request.getfixturevalue("redis_server")
        row: Row = FAULTS[fault](rig, redis)
    else:
        row = FAULTS[fault](rig)
    rows.append(row)
    print("\n" + table([row]))
    assert row.requests > 0, row
    assert row.broken == [], f"{row.fault}: {row.broken}; callers saw {dict(row.outcomes)}"
