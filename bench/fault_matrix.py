"""The fault matrix: what callers see when a node, Redis or the gateway itself is hit under load.

    .venv/bin/python bench/fault_matrix.py            # every fault, about a minute and a half
    .venv/bin/python bench/fault_matrix.py node-hung sigterm-keepalive

Starts three simulated nodes (``twistd sentinel-simnode``) and gateways (``twistd sentinel-proxy``)
on loopback ports, runs a bounded load of 12 callers under each fault (``tests/fault_load.py``) and
prints the markdown table kept in docs/failure-handling.md. ``tests/test_fault_matrix.py`` runs the
same faults and asserts their promises. Every process it starts is stopped by PID.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fault_load import FAULTS, Rig, Row, table  # noqa: E402 - after the path is set
from tests.processes import REDIS_SERVER, RedisServer  # noqa: E402


def run(names: list[str]) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as directory:
        rig = Rig(Path(directory))
        try:
            for name in names:
                began = time.monotonic()
                if name == "redis-killed":
                    if REDIS_SERVER is None:
                        print(f"{name}: skipped, redis-server is not installed", file=sys.stderr)
                        continue
                    redis = RedisServer(REDIS_SERVER)
                    redis.start()
                    try:
                        rows.append(FAULTS[name](rig, redis))
                    finally:
                        redis.kill()
                else:
                    rows.append(FAULTS[name](rig))
                print(f"{name}: {time.monotonic() - began:.1f} s", file=sys.stderr)
        finally:
            rig.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("faults", nargs="*", metavar="FAULT", help="faults to run (default: all): " + ", ".join(FAULTS))
    names = parser.parse_args().faults or list(FAULTS)
    unknown = [name for name in names if name not in FAULTS]
    if unknown:
        parser.error(f"unknown fault {', '.join(unknown)} (choose from: {', '.join(FAULTS)})")
    if shutil.which("twistd", path=str(Path(sys.executable).parent)) is None:
        raise SystemExit("run with the project's venv: .venv/bin/python bench/fault_matrix.py")
    print(table(run(names)))


if __name__ == "__main__":
    main()
