"""SHARED_STATE's parts: the snapshot as JSON, the Redis lease with its fencing token, and the fleet
service's roles (prober, follower, alone) against a real redis-server, stopped and restarted."""
from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from sentinel_proxy.core.agreement import Agreement, Contest, Divergence, Majority
from sentinel_proxy.core.integrity import EpochFinding, IntegrityVerdict
from sentinel_proxy.core.scoring import OPEN
from sentinel_proxy.fleet import codec
from sentinel_proxy.state.backends import BackendPool, TipsReport
from sentinel_proxy.state.status import RequestTotals, health_document
from tests.deferreds import pause

RETRY = 1.0  # sentinel_proxy.fleet.service.RETRY: imported there, since txredisapi installs the reactor

URLS = ["http://user:sekrit@127.0.0.1:9001", "http://127.0.0.1:9002/v1/KEY123", "http://127.0.0.1:9003"]


def decided_pool() -> BackendPool:
    """A pool with everything the checks decide set to something other than its default."""
    pool = BackendPool(URLS)
    first, second, _ = pool.backends
    finding = EpochFinding(7, 90, "WARNING", 4, 8, 24, {"block-mined": 8}, (3,), (), ("one slot missing",))
    verdict = IntegrityVerdict("good", 97, (5,), (7,), "pruned", 9, 10, 64, 300, (finding,), {4: "too early"},
                               ("fine",))
    pool.record_integrity(first, verdict)
    pool.record_health(first, True, 1000.0, block_number=42, latency_ms=12.5, chain=("1", "2"),
                       protocol_contracts="0xab", oldest_block=3,
                       tips={"finalized": {"number": 40, "hash": "0x01"}, "$odd": [1]},
                       tips_report=TipsReport("node_getL2Tips", True), archive=(40, "0xfe"))
    pool.record_health(second, False, 1001.0, error="connection refused")
    divergence = Divergence("block hash", 40, "0x02", "0x01", 2, 3, "finalized tip")
    second.divergence = divergence
    second.quarantine["diverged"] = divergence.reason()
    pool.finalized = 40
    pool.agreement = Agreement((Majority("block hash", 40, "0x01", 2, 3),), {second.name: divergence},
                               Contest("archive root", 41, (("0xa", ("a",)), ("0xb", ("b",)))), 41)
    return pool


def test_snapshot_round_trip_is_json_without_urls():
    pool = decided_pool()
    blob = codec.encode(pool)
    document = json.loads(blob)
    assert document["v"] == codec.VERSION
    for secret in (b"sekrit", b"KEY123", b"user"):
        assert secret not in blob
    other = BackendPool(list(reversed(URLS)))  # another gateway, the same nodes in another order
    other.apply(codec.decode(blob, other))
    assert other.finalized == 40 and other.agreement == pool.agreement
    for backend in pool.backends:
        twin = next(b for b in other.backends if b.url == backend.url)
        for name in BackendPool.SHARED_STATE:
            if name == "latency":
                assert twin.latency.samples == backend.latency.samples
            else:
                assert getattr(twin, name) == getattr(backend, name), name
        assert (twin.routing, twin.priority, twin.node_type) == (backend.routing, backend.priority, backend.node_type)


def test_a_document_of_another_version_or_type_is_refused():
    pool = BackendPool(URLS)
    with pytest.raises(codec.SnapshotError, match="version"):
        codec.decode(json.dumps({"v": codec.VERSION + 1}).encode(), pool)
    hostile = {"v": codec.VERSION, "finalized": None, "agreement": {"$": "Popen", "args": ["true"]}, "backends": {}}
    with pytest.raises(codec.SnapshotError, match="unknown type"):
        codec.decode(json.dumps(hostile).encode(), pool)
    with pytest.raises(codec.SnapshotError, match="not JSON"):
        codec.decode(b"\x80pickle", pool)


def test_fleets_with_other_node_lists_do_not_share_keys():
    assert codec.fleet_id(URLS) == codec.fleet_id(list(reversed(URLS)))
    assert codec.fleet_id(URLS) != codec.fleet_id(URLS[:2])
    assert codec.node_id(URLS[0]) != codec.node_id(URLS[1])


# ------------------------------------------------------------------ against a real redis-server


class FakeCheck:
    """A check service that only says whether it runs."""

    def __init__(self) -> None:
        self.running = False
        self.starts = 0

    def startService(self) -> None:
        self.running = True
        self.starts += 1

    def stopService(self) -> None:
        self.running = False


@pytest_twisted.async_yield_fixture
async def fleet_parts():
    """Makes (store, link) pairs on one Redis, closed at the end."""
    from sentinel_proxy.fleet.store import FleetStore
    from sentinel_proxy.stores.redis_link import RedisLink

    links = []

    def make(url: str):
        link = RedisLink(url, reactor, 0.5, role="test", outage="none")
        links.append(link)
        return FleetStore(link, codec.fleet_id(URLS)), link

    yield make
    for link in links:
        await link.close()


@pytest_twisted.ensureDeferred
async def test_one_lease_at_a_time_and_its_expiry_hands_over(redis_server, fleet_parts):
    store, _ = fleet_parts(redis_server.url)
    first = await store.acquire("a", 300)
    assert (first.token, first.holder) == (1, "a")
    assert await store.acquire("b", 300) == first  # b sees a's lease, takes nothing
    assert await store.renew(first, 300)
    assert not await store.renew(type(first)(first.token, "b"), 300)
    deadline = reactor.seconds() + 5
    while (second := await store.acquire("b", 5000)).holder != "b":
        assert reactor.seconds() < deadline, "the lease never expired"
        await pause(0.05)
    assert second.token == 2
    assert not await store.renew(first, 300)  # a's lease is gone for good
    assert await store.publish(2, b"new") is not None
    assert await store.publish(1, b"stale") is None  # fenced: a's late publish is refused
    reading = await store.read("", [])
    assert (reading.state, reading.token, reading.lease) == (b"new", 2, second)
    assert (await store.read(reading.seq, [])).state is None  # nothing new since
    assert await store.release(second) and (await store.read(reading.seq, [])).lease is None


def fleet_service(store, pool: BackendPool, name: str, clock: Clock):
    from sentinel_proxy.fleet.service import FleetService

    check = FakeCheck()
    service = FleetService(pool, [check], store, clock, interval=lambda: 1.0, cooldown=lambda: 5.0, instance=name)
    service.running = True  # its loop is driven by hand: tick() below
    pool.on_breaker_change = service.breaker_changed
    return service, check


@pytest_twisted.ensureDeferred
async def test_prober_and_follower_share_verdicts_drains_and_openings(redis_server, fleet_parts):
    clock = Clock()
    prober_pool, follower_pool = decided_pool(), BackendPool(URLS)
    prober, prober_check = fleet_service(fleet_parts(redis_server.url)[0], prober_pool, "p", clock)
    follower, follower_check = fleet_service(fleet_parts(redis_server.url)[0], follower_pool, "f", clock)
    await prober.tick()
    await follower.tick()
    assert (prober.role, prober_check.running) == ("prober", True)
    assert (follower.role, follower_check.running) == ("follower", False)
    assert follower_pool.finalized == 40 and follower_pool.backends[0].block_number == 42
    assert follower_pool.fleet == {"prober": "p", "this": "f", "role": "follower", "redis": "ok", "token": 1}
    assert health_document(follower_pool, RequestTotals(), 1.0)["fleet"]["prober"] == "p"

    # A drain on the follower reaches the prober, and an undrain comes back.
    follower_pool.drain(follower_pool.backends[2], True)
    await follower.tick()
    await prober.tick()
    assert prober_pool.backends[2].drained and prober_pool.backends[2].routing == "drained"
    prober_pool.drain(prober_pool.backends[2], False)
    await prober.tick()
    await follower.tick()
    assert not follower_pool.backends[2].drained

    # An opening on the prober opens the follower's breaker, once.
    breaker = prober_pool.backends[0].breaker
    while breaker.state != OPEN:
        breaker.record(False, 0.0)
    await pause(0.1)  # the opening is written without waiting for a round
    await follower.tick()
    assert follower_pool.backends[0].breaker.state == OPEN
    await prober.tick()
    assert breaker.state == OPEN and len(breaker.transitions) == 1  # not sent back


@pytest_twisted.ensureDeferred
async def test_redis_down_means_alone_with_own_checks_then_rejoin(redis_server, fleet_parts):
    logged: list[str] = []
    observer = lambda event: logged.append(formatEvent(event)) if "shared state" in formatEvent(event) else None
    globalLogPublisher.addObserver(observer)
    try:
        clock = Clock()
        pool = BackendPool(URLS)
        service, check = fleet_service(fleet_parts(redis_server.url)[0], pool, "f", clock)
        other, _ = fleet_service(fleet_parts(redis_server.url)[0], decided_pool(), "p", clock)
        await other.tick()
        await service.tick()
        assert (service.role, check.running) == ("follower", False)

        redis_server.kill()
        await service.tick()
        assert service.tick() is None  # Redis is left alone for a while
        assert (service.role, check.running, service.redis_ok) == ("alone", True, False)
        assert pool.fleet["redis"] == "down" and pool.fleet["prober"] == "f"
        assert pool.backends[0].block_number == 42  # its last known state stays
        pool.drain(pool.backends[1], True)  # a drain while Redis is down stays local

        redis_server.start()  # same port, empty: p's lease is gone
        deadline = reactor.seconds() + 10
        while not service.redis_ok:  # the Redis client reconnects on its own schedule
            assert reactor.seconds() < deadline, "never rejoined"
            clock.advance(RETRY)
            await service.tick()
            await pause(0.05)
        assert (service.role, service.redis_ok) == ("prober", True)  # p's lease expired meanwhile
        await other.tick()
        assert other.role == "follower" and other._pool.backends[1].drained
        down = [line for line in logged if "unreachable" in line]
        back = [line for line in logged if "rejoins" in line]
        assert len(down) == 1 and len(back) == 1, logged
    finally:
        globalLogPublisher.removeObserver(observer)
