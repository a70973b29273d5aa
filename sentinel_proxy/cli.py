"""The ``sentinel-proxy`` command: ``run``, ``check-config`` and ``--version``.

``run`` is ``twistd -n --pidfile= sentinel-proxy`` in this process, through twistd's own runner,
so signals, the drain on SIGTERM, logging and the exit status are twistd's; ``twistd
sentinel-proxy`` stays the same daemon.
"""
from __future__ import annotations

import platform
import sys
from typing import Sequence

import twisted

from sentinel_proxy import __version__

USAGE = """\
usage: sentinel-proxy COMMAND [options]

commands:
  run [options]           run the gateway in the foreground (twistd -n --pidfile= sentinel-proxy [options])
  check-config [options]  check the environment, .env and options as a start would, and print the
                          effective configuration (secrets masked); exit 0 if good, 1 if not
  --version               the versions of sentinel-proxy, Twisted and Python

The options are those of twistd sentinel-proxy; `sentinel-proxy run --help` lists them.
"""


def version() -> str:
    return f"sentinel-proxy {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def run(args: Sequence[str]) -> int:
    """twistd reads its command line from ``sys.argv``: this process's becomes twistd's."""
    from twisted.scripts.twistd import run as twistd

    sys.argv = [sys.argv[0], "-n", "--pidfile=", "sentinel-proxy", *args]
    twistd()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "--version":
        print(version())
        return 0
    if command == "run":
        return run(rest)
    if command == "check-config":
        from sentinel_proxy.check_config import check_config

        return check_config(rest, sys.stdout, sys.stderr)
    sys.stderr.write(f"sentinel-proxy: unknown command {command!r}: run, check-config or --version\n")
    return 2


if __name__ == "__main__":  # python -m sentinel_proxy.cli
    sys.exit(main())
