"""``cliplab train CONFIG``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one experiment on Ray Train",
                       description="Run one experiment (YAML or Python CONFIG) as a Ray Train "
                                   "TorchTrainer job. The config is validated and the shards and "
                                   "MLflow server are checked before any Ray work starts.")
    p.add_argument("config", help="experiment file (.yaml or .py defining CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")
    p.add_argument("--dry-run", action="store_true", help="validate and check inputs, then stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cliplab.config import load_experiment
    from cliplab.train.launch import preflight, run_training

    cfg = load_experiment(args.config, args.overrides)
    if args.dry_run:
        prep = preflight(cfg)
        print(f"ok: {len(prep.train.paths)} train shards"
              + (f", {len(prep.val.paths)} val shards" if prep.val else ""))
        return 0
    result = run_training(cfg, address=args.address, name=args.name)
    if result.error:
        print(f"training failed: {result.error}")
        return 1
    metrics = result.metrics or {}
    print("final metrics:")
    for key in sorted(metrics):
        if key.startswith(("train/loss", "val/")):
            print(f"  {key:40s} {metrics[key]:.4f}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    return 0
