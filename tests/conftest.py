# No project or klein imports at module level: they would install a reactor before pytest-twisted.
import pytest_twisted


@pytest_twisted.async_yield_fixture
async def cluster():
    """Simulated nodes and gateways started by the test, all stopped afterwards."""
    from tests.support import Cluster

    started = Cluster()
    yield started
    await started.stop()
