"""CPU per request of the forwarding clients: FastForwardingClient vs TreqForwardingClient (treq over an Agent).

Not a test. Starts a minimal raw-Twisted HTTP/1.1 keep-alive server in a subprocess on 127.0.0.1
(so its CPU is not counted), then, in this process, sends N POSTs with C in flight through each
client and prints the client process's CPU (user + system, ``resource.getrusage``) per request.
A null client (answers at once, no I/O) measures the harness itself (the 64 driver coroutines).
Bounded: at most N requests per client and at most --seconds of wall time each.

    .venv/bin/python bench/client_cpu.py [-n 20000] [-c 64] [--seconds 60]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

ANSWER_BODY = b'[{"jsonrpc":"2.0","id":1,"result":1000}]'
REQUEST_BODY = b'[{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber","params":[]}]'


def serve() -> None:
    """The node: answers every request with the same small JSON body, keep-alive, no parsing beyond
    finding the end of each request (headers + Content-Length)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Aztec-Test: 1\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER_BODY), ANSWER_BODY))

    class Node(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            buffer = self.buffer + data
            out = []
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) \
                    if at >= 0 else 0
                if len(buffer) < end + 4 + length:
                    break
                buffer = buffer[end + 4 + length:]
                out.append(answer)
            self.buffer = buffer
            if out:
                self.transport.write(b"".join(out))

    factory = Factory.forProtocol(Node)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    print(port.getHost().port, flush=True)
    reactor.callLater(600, reactor.stop)  # never outlive a crashed parent by long
    reactor.run()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class NullClient:
    """Answers at once: what the harness costs without any client."""

    def __init__(self) -> None:
        from twisted.internet import defer
        from sentinel_proxy.upstream.client import UpstreamResponse

        self._answer = UpstreamResponse(200, (), ANSWER_BODY)
        self._succeed = defer.succeed

    def post(self, backend, body, headers, timeout, limit=None):
        return self._succeed(self._answer)

    def close(self):
        return self._succeed(None)


async def drive(client, backend, count: int, concurrency: int, seconds: float) -> tuple[int, float, float]:
    from twisted.internet import defer

    headers = ((b"content-type", b"application/json"), (b"x-request-id", b"bench"))
    issued = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            issued += 1
            answer = await client.post(backend, REQUEST_BODY, headers, 10.0)
            if answer.code != 200 or answer.body != ANSWER_BODY:
                raise AssertionError(f"bad answer: {answer!r}")

    started_cpu, started = cpu(), time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True)
    return issued, cpu() - started_cpu, time.monotonic() - started


async def main(reactor, args: argparse.Namespace) -> None:
    from sentinel_proxy.state.backends import Backend
    from sentinel_proxy.upstream.treq_client import TreqForwardingClient
    from sentinel_proxy.upstream.http11 import FastForwardingClient

    node = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE)
    try:
        port = int(node.stdout.readline())
        backend = Backend(f"http://127.0.0.1:{port}/")
        clients = [("null (harness only)", NullClient()),
                   ("FastForwardingClient", FastForwardingClient(reactor)),
                   ("TreqForwardingClient (treq over Agent)", TreqForwardingClient(reactor))]
        if args.only:
            clients = [c for c in clients if args.only.lower() in c[0].lower()]
        print(f"N={args.n} concurrency={args.c} node=127.0.0.1:{port} (subprocess; its CPU not counted)")
        for name, client in clients:
            for _ in range(args.rounds):
                await drive(client, backend, min(2000, args.n), args.c, args.seconds)  # warm up: connections, caches
                done, used, wall = await drive(client, backend, args.n, args.c, args.seconds)
                print(f"{name:24s} {done:6d} requests  {used / done * 1e6:7.1f} µs CPU/request  "
                      f"{done / wall:8.0f} requests/s", flush=True)
            await client.close()
    finally:
        node.terminate()
        node.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20000, help="requests per client (default 20000)")
    parser.add_argument("-c", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall-time bound per client run")
    parser.add_argument("--rounds", type=int, default=1, help="measured runs per client")
    parser.add_argument("--only", default="", help="run only clients whose name contains this")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
