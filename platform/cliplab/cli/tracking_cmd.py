"""``cliplab tracking flush SPOOL``: send tracking records a run kept on disk while MLflow was down."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tracking", help="MLflow tracking utilities",
                       description="Utilities for MLflow tracking records buffered on disk.")
    cmds = p.add_subparsers(dest="tracking_command", metavar="COMMAND", required=True)
    flush = cmds.add_parser("flush", help="send records a run buffered while MLflow was unreachable",
                            description="Send the unsent records of spool folders (a run prints the folder "
                                        "when MLflow stayed down past tracking.flush_timeout_s). With no "
                                        "argument, every folder under the default spool root.")
    flush.add_argument("spool", nargs="*", type=Path, help="spool folder(s) of a run")
    flush.add_argument("--tracking-uri", default=None,
                       help="send to this server instead of the one the run used")
    flush.set_defaults(func=run_flush)


def run_flush(args: argparse.Namespace) -> int:
    from cliplab.errors import ServiceError
    from cliplab.tracking.spool import default_spool_root, flush_spool

    spools = args.spool or sorted(p for p in default_spool_root().glob("*") if (p / "meta.json").is_file())
    if not spools:
        print(f"nothing to flush under {default_spool_root()}")
        return 0
    for spool in spools:
        if not (spool / "meta.json").is_file():
            raise ServiceError(f"{spool} is not a tracking spool folder (no meta.json)")
        try:
            sent = flush_spool(spool, args.tracking_uri)
        except Exception as err:  # noqa: BLE001 - report which spool failed, keep it for a retry
            raise ServiceError(f"could not flush {spool}: {err}; it is kept, retry when MLflow is up") from None
        print(f"{spool}: sent {sent} records")
    return 0
