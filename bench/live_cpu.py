"""User and kernel CPU per request of the running gateway, A/B: alternating runs of two or more trees.

Not a test. ``../shared/bench`` gives ratios against the anchors; this script gives what an
optimisation needs in between: the same cell run several times per tree, alternating, so that a
few percent can be told from the noise, and the user / kernel split of each run (fields 14 and 15
of ``/proc/<pid>/stat`` before and after the measured wrk run). It is how the figures of
docs/performance.md's last round on issue 15 were taken.

Layout as in ``../shared/bench --pin on``: the gateway on CPU 0; the fast Go node
(``bench-gobench backend``, built by a first run of ``../shared/bench/run.sh``) and wrk on CPU 1;
wrk ``-t1`` with the ``batch1`` script. Each run: start the gateway, wait for ``/ready``, warm for
3 s, measure for ``--duration`` s, stop it. Bounded: ``--runs`` rounds, each a few seconds per tree.

    # A/B of the working tree against a copy of an older commit (imported first via PYTHONPATH):
    git archive ef9335d sentinel_proxy sentinel_simnode | tar -x -C /tmp/before
    .venv/bin/python bench/live_cpu.py --tree now=. --tree before=/tmp/before [--runs 2] [-- --cache memory]

Arguments after ``--`` go to every gateway (default ``--cache off``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "bench")
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def ticks(pid: int) -> tuple[int, int]:
    """(user, kernel) clock ticks the process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line


def wait_ready(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the gateway on port {port} was not ready within {seconds:g} s")


def wrk(port: int, seconds: int, connections: int) -> int:
    """Requests wrk completed in ``seconds``."""
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s",
                          os.path.join(SHARED, "jsonrpc_batch1.lua"), f"http://{HOST}:{port}/"],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise SystemExit(f"wrk printed no request count:\n{out}")
    return int(match.group(1))


def run(tree: str, backends: str, extra: list[str], seconds: int, connections: int) -> tuple[float, float]:
    """(user, kernel) µs per request of one measured run of the gateway from ``tree``."""
    port = free_port()
    env = dict(os.environ)
    if os.path.abspath(tree) != ROOT:
        env["PYTHONPATH"] = os.path.abspath(tree)  # the copy's package is imported first
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    with tempfile.TemporaryFile() as log:
        gateway = subprocess.Popen(["taskset", "-c", "0", twistd, "-n", "--pidfile=", "sentinel-proxy", "--port",
                                    str(port), "--backends", backends, *extra],
                                   cwd=tempfile.gettempdir(), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port)
            wrk(port, 3, connections)
            user, kernel = ticks(gateway.pid)
            requests = wrk(port, seconds, connections)
            user_after, kernel_after = ticks(gateway.pid)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
    scale = 1e6 / TICK / requests
    return (user_after - user) * scale, (kernel_after - kernel) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a tree to measure (its sentinel_proxy package); repeat for an A/B")
    parser.add_argument("--runs", type=int, default=2, help="rounds; each runs every tree once, in turn")
    parser.add_argument("--duration", type=int, default=8, help="seconds measured per run")
    parser.add_argument("-c", type=int, default=64, help="wrk connections")
    parser.add_argument("--backend-bin", default=os.path.join(tempfile.gettempdir(), "bench-gobench"),
                        help="the Go fake node built by ../shared/bench/run.sh")
    parser.add_argument("gateway_args", nargs="*", help="after --: options for every gateway")
    options = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (../shared/bench/run.sh installs what it needs)")
    if not os.path.exists(options.backend_bin):
        raise SystemExit(f"{options.backend_bin} is missing: run ../shared/bench/run.sh once to build it")
    trees = [spec.split("=", 1) for spec in options.tree]
    extra = options.gateway_args or ["--cache", "off"]
    ports = [free_port(), free_port()]
    backend = subprocess.Popen(["taskset", "-c", "1", options.backend_bin, "backend", "-host", HOST, "-ports",
                                ",".join(map(str, ports)), "-delay", "0s"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        backends = ",".join(f"http://{HOST}:{port}" for port in ports)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
        for round_ in range(options.runs):
            for name, path in trees:
                user, kernel = run(path, backends, extra, options.duration, options.c)
                results[name].append((user, kernel))
                print(f"round {round_ + 1} {name:12s} {user + kernel:6.1f} µs/request "
                      f"(user {user:5.1f}, kernel {kernel:5.1f})", flush=True)
    finally:
        backend.terminate()
        backend.wait(timeout=10)
    print()
    for name, runs in results.items():
        totals = sorted(user + kernel for user, kernel in runs)
        print(f"{name:12s} {' / '.join(f'{t:.1f}' for t in totals)} µs/request")


if __name__ == "__main__":
    main()
