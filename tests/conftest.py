"""Fixtures shared by the test modules; helpers live in support.py, processes.py and deferreds.py.

No project or klein imports at module level: they would install a reactor before pytest-twisted.
"""
import gc
import os

import pytest
import pytest_twisted


@pytest_twisted.async_yield_fixture
async def cluster():
    """Simulated nodes and gateways started by the test, all stopped afterwards."""
    from tests.support import Cluster

    started = Cluster()
    yield started
    await started.stop()


@pytest.fixture
def redis_server():
    """A throwaway redis-server on a loopback port. Skipped without the binary, except under
    ``CI=true``, where a missing server is a broken setup and fails."""
    from tests.processes import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but redis-server is not installed: the Redis tests cannot run")
        pytest.skip("redis-server is not installed")
    server = RedisServer(REDIS_SERVER)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def collector():
    """The test process's garbage collector as it was, restored after a test that tunes it
    (``makeService`` freezes the heap and raises the young threshold: ops/heap.py)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.fixture
def epoll_reactor():
    """An epoll reactor of the test's own, not installed and not running (a test turns it itself):
    for what changes a reactor (twisted_private.dispatch_io_directly, which makeService applies),
    where the test process's must stay as it is. Its waker and epoll descriptor are closed after."""
    from twisted.internet.epollreactor import EPollReactor

    made = EPollReactor()
    yield made
    made.waker.connectionLost(None)
    made._poller.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a real redis-server is slow by definition: it starts one."""
    for item in items:
        if "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def unhandled():
    """Failures logged while the test runs ("Unhandled error in Deferred" included, once the
    Deferred is collected): the test may inspect and clear them; any left fail it."""
    import gc

    from twisted.logger import globalLogPublisher

    logged: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event or event.get("isError"):
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    yield logged
    gc.collect()
    globalLogPublisher.removeObserver(observe)
    assert not logged, [event.get("log_format") for event in logged]


@pytest.fixture
def logged():
    """Every event of the global log publisher while the test runs."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
