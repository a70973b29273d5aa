"""CPU per request of the server side: the lean server (web/server.py) vs twisted.web's Site + RpcResource.

Not a test. For each server it starts a server process with a trivial request path (a constant
``Reply``, no I/O), and that process starts a keep-alive load client in a subprocess (so the
client's CPU is not counted): C connections, each sending the next POST when its answer is in.
The server process measures its own CPU (user + system, ``resource.getrusage``) from the
W-th request its request path sees (warm-up) to the (W+N)-th, and prints µs per request.
Bounded: N requests per server, and at most --seconds of wall time each.

    .venv/bin/python bench/server_cpu.py [-n 20000] [-c 64] [--warmup 2000] [--seconds 120]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REQUEST_BODY = b'[{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber","params":[]}]'
ANSWER_BODY = b'[{"jsonrpc":"2.0","id":1,"result":1000}]'
SERVERS = ("lean", "site")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------ the load client


def client(port: int, total: int, concurrency: int) -> None:
    """C keep-alive connections, one request in flight on each, until ``total`` answers are in."""
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Protocol

    request = (b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(REQUEST_BODY), REQUEST_BODY))
    state = {"sent": 0, "answered": 0}

    class Load(Protocol):
        buffer = b""

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            self.send()

        def send(self) -> None:
            if state["sent"] < total:
                state["sent"] += 1
                self.transport.write(request)
            else:
                self.transport.loseConnection()

        def dataReceived(self, data: bytes) -> None:
            buffer = self.buffer + data
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end].lower()
                at = head.find(b"content-length:")
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop > 0 else None])
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length:]
                state["answered"] += 1
                if state["answered"] >= total:
                    reactor.stop()
                    return
                self.send()
            self.buffer = buffer

    factory = ClientFactory.forProtocol(Load)
    for _ in range(concurrency):
        reactor.connectTCP("127.0.0.1", port, factory)
    reactor.callLater(600, reactor.stop)  # never outlive a crashed parent by long
    reactor.run()


# ----------------------------------------------------------------------------------- the server


def serve(kind: str, total: int, concurrency: int, warmup: int, seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from sentinel_proxy.config import load_settings
    from sentinel_proxy.proxy.values import JSON_HEADERS, Reply
    from sentinel_proxy.web.auth import Access
    from sentinel_proxy.web.rpc import RpcResource
    from sentinel_proxy.web.site import make_site

    reply = Reply(200, ANSWER_BODY, JSON_HEADERS)
    marks: dict[str, float] = {}
    count = [0]

    class Trivial:
        async def handle(self, route, body, headers, body_too_large, caller):
            count[0] += 1
            if count[0] == warmup:
                marks["cpu0"], marks["wall0"] = cpu(), time.perf_counter()
            elif count[0] == warmup + total:
                marks["cpu1"], marks["wall1"] = cpu(), time.perf_counter()
            return reply

    settings = load_settings(cli={"backends": "http://a:1"}, environ={}, dotenv_path=None)
    access = Access(lambda: settings)
    site = make_site(RpcResource(Trivial(), access, Resource()), settings.max_body_bytes, 60.0)
    if kind == "lean":
        from sentinel_proxy.web.server import LeanServerFactory

        factory = LeanServerFactory(Trivial(), access, site, reactor, settings.max_body_bytes, 60.0)
    else:
        factory = site
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    load = subprocess.Popen([sys.executable, __file__, "--client", str(port.getHost().port), "-n",
                             str(total + warmup), "-c", str(concurrency)], cwd=ROOT)

    def check() -> None:
        if load.poll() is not None or time.perf_counter() > deadline:
            reactor.stop()
        else:
            reactor.callLater(0.2, check)

    deadline = time.perf_counter() + seconds
    reactor.callLater(0.2, check)
    reactor.run()
    if load.poll() is None:
        load.kill()
    load.wait()
    if "cpu1" not in marks:
        print(f"{kind}: did not finish ({count[0]} of {warmup + total} requests within {seconds:g} s)", flush=True)
        return
    requests = total
    per_request = (marks["cpu1"] - marks["cpu0"]) / requests * 1e6
    rate = requests / (marks["wall1"] - marks["wall0"])
    print(f"{kind}: {per_request:.1f} us CPU per request, {rate:,.0f} req/s ({requests} requests, "
          f"{concurrency} connections)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="requests measured per server")
    parser.add_argument("-c", type=int, default=64, help="keep-alive connections")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=120.0, help="wall-time bound per server")
    parser.add_argument("--server", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.client is not None:
        client(options.client, options.n, options.c)
    elif options.server is not None:
        serve(options.server, options.n, options.c, options.warmup, options.seconds)
    else:
        for kind in SERVERS:
            subprocess.run([sys.executable, __file__, "--server", kind, "-n", str(options.n), "-c", str(options.c),
                            "--warmup", str(options.warmup), "--seconds", str(options.seconds)], cwd=ROOT,
                           timeout=options.seconds + 60, check=False)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
