"""Helpers for tests that run real processes: twistd daemons and a throwaway redis-server.

Every process is started by the test, tracked by PID and stopped by PID; every wait is bounded.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

TWISTD = [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile="]
ROOT = Path(__file__).resolve().parent.parent
#: Nothing from the developer's shell may leak in: settings come only from each test's arguments.
#: A daemon's drain waits DRAIN_DELAY_MS (3 s by default, for load balancers) before it closes its
#: listener: the tests' daemons wait 20 ms unless a test says otherwise.
CLEAN_ENV = {**{k: v for k, v in os.environ.items()
                if not re.match(r"(SENTINEL_|PROXY_|LOG_LEVEL|REQUEST_|HEALTH_|INTEGRITY_|SLOTS_|EXPECTED_|ARCHIVER_|"
                                r"MAX_|UPSTREAM_|DRAIN_|SHUTDOWN_|CLIENT_)", k)},
             "DRAIN_DELAY_MS": "20"}


def run_twistd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(TWISTD + args, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=60)


class Daemon:
    """A twistd subprocess whose log is read on a thread, so waits are bounded and never block on I/O."""

    def __init__(self, args: list[str], cwd: Path):
        self.process = subprocess.Popen(TWISTD + args, cwd=cwd, env=CLEAN_ENV, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=5)
            self._reader.join(timeout=5)
            self.process.stdout.close()


def fetch(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def poll(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resp(port: int, *args: str | bytes) -> bytes:
    """One raw Redis command over a fresh connection (independent of the code under test)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
        connection.sendall(b"".join(parts))
        return connection.recv(65536)


class RedisServer:
    """A throwaway redis-server on a loopback port, started and killed by PID."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                if resp(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
