"""``cliplab demo``: the main job on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on embedded services",
                       description="Start local S3, MLflow and Ray; render the emoji corpus into shards "
                                   "on S3; train each objective (CLIP, SigLIP, CLOOB, MERU, X-CLR) on Ray Tune; register the "
                                   "best model as cliplab-demo@champion; print the results table.")
    p.add_argument("--quick", action="store_true", help="one short trial per objective (a smoke run, ~4 minutes)")
    p.add_argument("--workdir", type=Path, default=Path(".cliplab/demo"),
                   help="where data, services' state and runs live (default: .cliplab/demo)")
    p.add_argument("--sweep", type=Path, default=Path("sweeps/demo.py"), help="sweep file to run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value of the sweep (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the services up until Ctrl-C")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cliplab.demo import run_demo

    result = run_demo(args.workdir, args.sweep, quick=args.quick, keep=args.keep,
                      extra_overrides=args.overrides)
    outcome = result["outcome"]
    return 0 if outcome.best and outcome.registered and not outcome.errors else 1
