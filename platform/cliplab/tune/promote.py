"""Champion / challenger: a sweep's best model takes the ``champion`` alias only if it beats the
current champion on the sweep's metric; otherwise it becomes the ``challenger``."""

from __future__ import annotations

from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"


def better(new: float, current: float | None, mode: str) -> bool:
    """Whether ``new`` beats ``current`` (no current champion: it wins). Ties keep the champion."""
    if current is None:
        return True
    return new > current if mode == "max" else new < current


def champion_score(client, name: str, metric: str) -> tuple[str | None, float | None]:
    """The current champion's version and its recorded value of ``metric`` (None when there is no
    champion, or it was registered without that metric)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = version.tags.get(f"metric.{metric}")
    return version.version, (float(value) if value not in (None, "") else None)


def register_and_promote(sweep, best: dict[str, Any]) -> dict[str, Any] | None:
    """Register the best trial (eval metrics as version tags) and alias it champion or challenger."""
    from mlflow import MlflowClient

    from cliplab.tracking.registry import register_checkpoint
    from cliplab.tracking.tracker import tracking_uri
    from cliplab.train.launch import storage_kwargs

    uri = tracking_uri(sweep.base.tracking)
    if not uri or not best.get("checkpoint_path"):
        return None
    client = MlflowClient(uri)
    name, metric, value = sweep.register_as, sweep.metric, float(best[sweep.metric])
    current_version, current = champion_score(client, name, metric) if _exists(client, name) else (None, None)
    tags = {f"metric.{k}": v for k, v in best.items() if k.startswith("val/") and isinstance(v, (int, float))}
    tags.update({"sweep": sweep.name, "sweep.metric": metric, "sweep.mode": sweep.mode, "trial": best["trial"],
                 f"metric.{metric}": value})
    reg = register_checkpoint(best["checkpoint_path"], name, None, uri=uri, run_id=best.get("mlflow_run_id") or None,
                              version_tags=tags, filesystem=storage_kwargs(sweep.base).get("storage_filesystem"))
    wins = better(value, current, sweep.mode)
    alias = CHAMPION if wins else CHALLENGER
    client.set_registered_model_alias(name, alias, str(reg["version"]))
    if current is None and current_version is None:
        decision = f"no champion yet: version {reg['version']} ({metric} = {value:.4f}) becomes {CHAMPION}"
    elif current is None:
        decision = (f"the champion (version {current_version}) has no recorded {metric}: "
                    f"version {reg['version']} ({value:.4f}) replaces it")
    elif wins:
        decision = (f"version {reg['version']} ({metric} = {value:.4f}) beats the champion version "
                    f"{current_version} ({current:.4f}): it becomes {CHAMPION}")
    else:
        decision = (f"version {reg['version']} ({metric} = {value:.4f}) does not beat the champion version "
                    f"{current_version} ({current:.4f}): it becomes {CHALLENGER}")
    return {**reg, "alias": alias, "model_uri": f"models:/{name}@{alias}", "decision": decision}


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
