"""The open-files budget (sentinel_proxy/ops/descriptors.py): the limit raised at start, and a
warning when the connection caps can outrun it."""
from __future__ import annotations

import resource
import subprocess
import sys

from twisted.logger import formatEvent, globalLogPublisher

from sentinel_proxy.ops import descriptors


def test_the_soft_limit_is_raised_to_the_hard_one():
    assert descriptors.raised(1024, 524288) == 524288
    assert descriptors.raised(1024, 1024) == 1024
    assert descriptors.raised(4096, resource.RLIM_INFINITY) == 4096


def test_what_a_configuration_may_hold():
    assert descriptors.needed(4096, 3, 128) == 4096 + 384 + descriptors.RESERVE


def test_a_cap_the_limit_cannot_hold_is_logged_with_what_fits():
    """In a child process: the limits are the process's own."""
    script = (
        "import resource\n"
        "from twisted.logger import formatEvent, globalLogPublisher\n"
        "from sentinel_proxy.ops import descriptors\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))\n"
        "lines = []\n"
        "globalLogPublisher.addObserver(lambda e: lines.append(formatEvent(e)))\n"
        "print(descriptors.ensure_open_files(4096, 2, 128))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(lines[-1] if lines else '')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    limit, soft, line = done.stdout.splitlines()
    assert (limit, soft) == ("512", "512")
    assert "open-files limit (512) is below" in line and "lower MAX_CONNECTIONS to 192" in line


def test_a_configuration_that_fits_says_nothing():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        limit = descriptors.ensure_open_files(1, 1, 1)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert limit >= soft
    assert not [line for line in lines if "open-files" in line]
