"""``cliplab registry list|promote``: the MLflow model registry, for people."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list registered models and move their aliases",
                       description="The MLflow model registry: versions with their aliases and the metrics "
                                   "their sweep recorded; promote a version to an alias by hand.")
    cmds = p.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    ls = cmds.add_parser("list", help="models, or the versions of one model",
                         description="Without NAME: every registered model. With NAME: its versions, aliases, "
                                     "source run and recorded metrics.")
    ls.add_argument("name", nargs="?", help="registered model name")
    ls.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI)")
    ls.set_defaults(func=run_list)
    pr = cmds.add_parser("promote", help="point an alias (default champion) at a version",
                         description="Point ALIAS at VERSION of NAME. The previous holder of the alias loses it "
                                     "(its version stays registered).")
    pr.add_argument("name", help="registered model name")
    pr.add_argument("version", help="version number")
    pr.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    pr.add_argument("--tracking-uri", default=None, help="MLflow server (default: MLFLOW_TRACKING_URI)")
    pr.set_defaults(func=run_promote)


def _client(uri: str | None):
    from mlflow import MlflowClient

    from cliplab.errors import ConfigError
    from cliplab.tracking.tracker import check_reachable, resolve_uri

    uri = resolve_uri(uri)
    if not uri:
        raise ConfigError("no MLflow server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    check_reachable(uri)
    return MlflowClient(uri)


def run_list(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from cliplab.errors import ConfigError
    from cliplab.report import markdown_table

    client = _client(args.tracking_uri)
    if not args.name:
        models = client.search_registered_models()
        rows = [{"name": m.name, "aliases": ", ".join(f"{a}→v{v}" for a, v in sorted(m.aliases.items())),
                 "latest": max((int(v.version) for v in m.latest_versions), default="")} for m in models]
        print(markdown_table(rows, [("name", "name"), ("aliases", "aliases"), ("latest version", "latest")])
              if rows else "no registered models")
        return 0
    try:
        aliases = client.get_registered_model(args.name).aliases
    except MlflowException:
        raise ConfigError(f"no registered model named '{args.name}' (see `cliplab registry list`)") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version)):
        metric = v.tags.get("sweep.metric", "")
        rows.append({"version": v.version, "aliases": ", ".join(sorted(by_version.get(v.version, []))),
                     "sweep": v.tags.get("sweep", ""), "metric": metric,
                     "value": v.tags.get(f"metric.{metric}", "") if metric else "", "run": v.run_id})
    print(markdown_table(rows, [(k, k) for k in ("version", "aliases", "sweep", "metric", "value", "run")]))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from cliplab.errors import ConfigError

    client = _client(args.tracking_uri)
    try:
        client.get_model_version(args.name, args.version)
    except MlflowException:
        raise ConfigError(f"{args.name} has no version {args.version} (see `cliplab registry list {args.name}`)") from None
    client.set_registered_model_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0
