"""The ``cliplab`` command: a thin argparse front over the library.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parser and sets ``func`` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys

from cliplab.errors import CliplabError

GROUPS = ("data", "services", "train", "sweep", "demo", "tracking", "registry", "dashboard", "submit", "jobs", "eval")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="cliplab",
        description="Contrastive image-text experiments on Ray: data, training, sweeps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        importlib.import_module(f"cliplab.cli.{name}_cmd").register(sub)
    return parser


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt  # so `finally` blocks stop the services this process started


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliplabError as err:
        print(f"cliplab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cliplab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
