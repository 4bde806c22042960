"""``cliplab train CONFIG``."""

from __future__ import annotations

import argparse

from cliplab.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one experiment on Ray Train",
                       description="Run one experiment (YAML or Python CONFIG) as a Ray Train "
                                   "TorchTrainer job. The config is validated and the shards and "
                                   "MLflow server are checked before any Ray work starts.")
    p.add_argument("config", nargs="?", help="experiment file (.yaml or .py defining CONFIG); optional with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")
    p.add_argument("--dry-run", action="store_true", help="validate and check inputs, then stop")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue a stopped run from its latest complete checkpoint (RUN is its name under "
                        "storage_path); without CONFIG the run's own config is reused")
    p.add_argument("--storage-path", default=None,
                   help="where runs live, for --resume without CONFIG (default: .cliplab/runs)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue even though the shards or data.* changed since the checkpoint "
                        "(the saved data position then applies to the new plan: some samples repeat or are missed)")
    p.set_defaults(func=run)


def _resume_config(args: argparse.Namespace):
    """The config of a run to resume: CONFIG when given, else its latest checkpoint's."""
    from cliplab.checkpoint import latest_in_storage, read_config
    from cliplab.config import ExperimentConfig, load_experiment, parse_override, validate, with_overrides

    if args.config:
        return load_experiment(args.config, args.overrides)
    root = (args.storage_path or ExperimentConfig().storage_path).rstrip("/")
    run_uri = f"{root}/{args.resume}"
    try:
        found = latest_in_storage(run_uri)  # s3://: endpoint and keys from the AWS_* environment
    except OSError as err:
        from cliplab.data.sources import s3_error_message

        raise ConfigError(s3_error_message(err, run_uri) if run_uri.startswith("s3://")
                          else f"cannot list {run_uri}: {err}") from None
    if found is None:
        raise ConfigError(f"no complete checkpoint under {run_uri}: check the run name and "
                          "--storage-path, or start it again with `cliplab train CONFIG`")
    cfg = with_overrides(read_config(*found), dict(parse_override(o) for o in args.overrides))
    from cliplab.config import to_dict
    from cliplab.redaction import masked_fields

    masked = masked_fields(to_dict(cfg))
    if masked:
        raise ConfigError(f"the checkpoint's config.json has secrets masked in {', '.join(masked)}: give them again "
                          f"(--set {masked[0]}=...), or keep them out of the config (MLFLOW_TRACKING_USERNAME/"
                          "PASSWORD, AWS_* from the environment or a Kubernetes Secret)")
    validate(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from cliplab.config import load_experiment
    from cliplab.train.launch import preflight, run_training

    if args.resume:
        cfg = _resume_config(args)
    elif not args.config:
        raise ConfigError("give an experiment file (cliplab train CONFIG) or --resume RUN")
    else:
        cfg = load_experiment(args.config, args.overrides)
    if args.dry_run:
        prep = preflight(cfg)
        print(f"ok: {len(prep.train.paths)} train shards"
              + (f", {len(prep.val.paths)} val shards" if prep.val else ""))
        return 0
    if args.resume:
        print(f"resuming run {args.resume} from its latest checkpoint")
    result = run_training(cfg, address=args.address, name=args.resume or args.name,
                          allow_data_change=args.allow_data_change)
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
