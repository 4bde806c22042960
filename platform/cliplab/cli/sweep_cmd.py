"""``cliplab sweep FILE``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a sweep file on Ray Tune",
                       description="Run a sweep file (sweeps/*.py defining SWEEP) on Ray Tune: one "
                                   "TorchTrainer per trial. The best trial is registered in MLflow "
                                   "when the sweep names a model.")
    p.add_argument("file", help="sweep file, e.g. sweeps/demo.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-register", action="store_true", help="do not register the best model")
    p.add_argument("--max-node-resources", default=None, metavar="GPU=8,CPU=96",
                   help="the largest node the cluster can scale to (default: the autoscaler's node types where "
                        "readable, else CLIPLAB_MAX_NODE_RESOURCES): a trial that fits no such node fails at once")
    p.add_argument("--scale-up-timeout", type=float, default=None, metavar="SECONDS",
                   help="on an autoscaling cluster, how long to wait for room for one trial before giving up "
                        "(default: the sweep's scale_up_timeout_s, 900, or CLIPLAB_SCALE_UP_TIMEOUT_S)")
    p.add_argument("--max-concurrent-trials", type=int, default=None, metavar="N",
                   help="run up to N trials at once (default: the sweep file's max_concurrent_trials, or as many "
                        "as the cluster holds when it sets none); each must fit the cluster")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones restart "
                        "from their checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: let trials continue even though the shards or data.* changed since their "
                        "checkpoints (their saved data positions then apply to the new plan)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from cliplab.errors import ConfigError
    from cliplab.tune import load_sweep, run_sweep
    from cliplab.tune.capacity import parse_resources
    from cliplab.tune.report import outcome_text

    sweep = load_sweep(args.file, args.overrides)
    if args.max_node_resources:
        sweep = dataclasses.replace(sweep, max_node_resources=parse_resources(args.max_node_resources))
    if args.scale_up_timeout is not None:
        if not args.scale_up_timeout > 0:
            raise ConfigError(f"--scale-up-timeout must be > 0 seconds, got {args.scale_up_timeout:g}")
        sweep = dataclasses.replace(sweep, scale_up_timeout_s=args.scale_up_timeout)
    if args.max_concurrent_trials is not None:
        if args.max_concurrent_trials < 1:
            raise ConfigError(f"--max-concurrent-trials must be >= 1, got {args.max_concurrent_trials}")
        sweep = dataclasses.replace(sweep, max_concurrent_trials=args.max_concurrent_trials)
    print(f"sweep {sweep.name}: {sweep.hypothesis.splitlines()[0] if sweep.hypothesis else ''}")
    outcome = run_sweep(sweep, address=args.address, register=not args.no_register, resume=args.resume,
                        allow_data_change=args.allow_data_change)
    print(outcome_text(sweep, outcome))
    return 0 if outcome.best and not outcome.errors and not outcome.registration_error else 1
