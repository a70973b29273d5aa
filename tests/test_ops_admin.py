"""The admin actions work from the parts they are given: no gateway, no web layer."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from sentinel_proxy.config import load_settings
from sentinel_proxy.ops.admin import Admin
from sentinel_proxy.state.backends import BackendPool

TOKEN = "an-admin-token-of-some-length"


class Check:
    def __init__(self):
        self.runs = 0

    def run_once(self) -> defer.Deferred[None]:
        self.runs += 1
        return defer.succeed(None)


def make_admin(pool: BackendPool, checks: list[Check], current: list, in_flight: list[int]) -> Admin:
    return Admin(pool, checks, lambda: current[0], lambda: in_flight[0])


def test_drain_and_config_read_what_the_getters_give_now():
    pool = BackendPool([("a", "http://a:1"), ("b", "http://b:1")])
    current = [load_settings(cli={"backends": "a=http://a:1,b=http://b:1", "admin_token": TOKEN}, environ={},
                             dotenv_path=None)]
    in_flight = [3]
    admin = make_admin(pool, [], current, in_flight)

    assert admin.drain("nobody", True) is None
    assert admin.drain("a", True) == {"backend": "a", "drained": True, "routing": "drained", "inFlight": 3}
    in_flight[0] = 0
    assert admin.drain("a", False)["inFlight"] == 0

    assert admin.config()["admin_token"] == "***" and admin.config()["max_attempts"] == 3
    current[0] = load_settings(cli={"backends": "http://a:1", "max_attempts": "5"}, environ={}, dotenv_path=None)
    assert admin.config()["max_attempts"] == 5 and admin.config()["admin_token"] == "", "a reload is seen at once"


@pytest_twisted.ensureDeferred
async def test_check_now_runs_every_check_it_was_given():
    pool = BackendPool([("a", "http://a:1")])
    checks = [Check(), Check()]
    admin = make_admin(pool, checks, [None], [0])
    report = await admin.check_now()
    assert [check.runs for check in checks] == [1, 1]
    backend = pool.backends[0]
    assert report == {"backends": [{"backend": "a", "healthy": backend.healthy, "blockNumber": backend.block_number,
                                    "integrityStatus": "", "routing": backend.routing,
                                    "lastError": backend.last_error}]}


def test_a_drain_is_handed_to_the_other_workers():
    pool = BackendPool([("a", "http://a:1")])

    class Workers:
        def __init__(self):
            self.drains = []

        def drained(self, backend):
            self.drains.append((backend.name, backend.drained))

    workers = Workers()
    admin = Admin(pool, [], lambda: None, lambda: 0, workers)
    admin.drain("a", True)
    admin.drain("nobody", True)
    admin.drain("a", False)
    assert workers.drains == [("a", True), ("a", False)]
