"""Run a sweep file on Ray Tune with the Ray 2.60 pattern.

``Tuner(trainable)`` can no longer wrap a trainer: each trial is a small driver function that
builds the trial's config from dotted-key overrides and launches its own ``TorchTrainer``,
which reports to Tune through ``TuneReportCallback``. The best trial's final checkpoint can then
be registered in MLflow (see :mod:`cliplab.tracking.registry`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.config import ExperimentConfig, load_python_file, parse_override, validate, with_overrides
from cliplab.errors import ConfigError


@dataclass(frozen=True)
class Sweep:
    """A question as code. The sweep file's docstring states the hypothesis.

    ``space`` maps dotted config keys to Ray Tune domains (``tune.grid_search``, ``tune.choice``,
    ``tune.uniform``, ``tune.loguniform``) or plain values.
    """

    base: ExperimentConfig
    space: dict[str, Any]
    metric: str = "val/image_to_text_R1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    register_as: str | None = None  # MLflow registered model name for the best trial
    alias: str = "champion"
    hypothesis: str = ""
    name: str = "sweep"
    summarize: Callable[[list[dict[str, Any]]], str] | None = None  # extra report from the rows

    @property
    def num_trials(self) -> int:
        """Grid points × ``num_samples`` (Tune's count for grid and sampled spaces alike)."""
        points = 1
        for domain in self.space.values():
            if isinstance(domain, dict) and "grid_search" in domain:
                points *= len(domain["grid_search"])
        return points * self.num_samples


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    registered: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Import a sweep file, apply ``--set`` overrides to its base config and validate every
    point of the space that can be checked up front (keys and, for grids/choices, values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    module = load_python_file(path)
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"{path}: must define SWEEP = cliplab.tune.Sweep(...)")
    base = with_overrides(sweep.base, dict(parse_override(o) for o in overrides or []))
    sweep = dataclasses.replace(sweep, base=base, hypothesis=sweep.hypothesis or (module.__doc__ or "").strip(),
                                name=sweep.name if sweep.name != "sweep" else path.stem)
    if sweep.mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be 'max' or 'min'")
    for values in _enumerable_points(sweep.space):
        validate(with_overrides(base, values))
    validate(base)
    return sweep


def _enumerable_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """One override dict per listed value (grid/choice), the rest sampled once, to validate keys
    and values before launching anything."""
    points: list[dict[str, Any]] = []
    for key, domain in space.items():
        if isinstance(domain, dict) and "grid_search" in domain:
            values = domain["grid_search"]
        elif hasattr(domain, "categories"):
            values = domain.categories
        elif hasattr(domain, "sample"):
            values = [domain.sample()]
        else:
            values = [domain]
        points.extend({key: v} for v in values)
    return points


def _trial(params: dict[str, Any], *, base: ExperimentConfig, prep_fields: dict, steps: int, sweep: str) -> None:
    """The Tune trainable: one TorchTrainer per trial, reporting through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliplab.train.launch import Prepared, build_datasets, build_trainer

    cfg = with_overrides(base, params)
    trial = tune.get_context().get_trial_name()
    prep = Prepared(cfg=cfg, **prep_fields)
    trainer = build_trainer(prep, name=f"{sweep}-{trial}", datasets=build_datasets(prep), steps=steps,
                            callbacks=[TuneReportCallback()], extra={"trial_name": trial, "sweep": sweep})
    trainer.fit()


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_sweep(sweep: Sweep, *, address: str | None = None, register: bool = True) -> SweepOutcome:
    from ray import tune

    from cliplab.train.launch import init_ray, preflight, steps_per_epoch, storage_path

    prep = preflight(sweep.base)
    # checkpoint and per-epoch reports come before the first eval, so not every result has the metric
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(address)
    steps = steps_per_epoch(sweep.base, prep.train)
    trainable = tune.with_parameters(
        _trial, base=sweep.base, prep_fields={"train": prep.train, "val": prep.val}, steps=steps, sweep=sweep.name
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),  # the driver only waits on its TorchTrainer
        param_space=sweep.space,
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path(sweep.base)),
    )
    grid = tuner.fit()
    rows, errors = [], []
    for result in grid:
        if result.error:
            errors.append(f"{result.path}: {result.error}")
        params = {k: result.config.get(k) for k in sweep.space}
        metrics = result.metrics or {}
        rows.append({"trial": Path(result.path).name, **params, **metrics})
    scored = [r for r in rows if isinstance(r.get(sweep.metric), (int, float))]
    if not scored:
        return SweepOutcome(rows, None, None, errors or ["no trial reported the metric " + sweep.metric])
    pick = max if sweep.mode == "max" else min
    best = pick(scored, key=lambda r: r[sweep.metric])
    registered = None
    if register and sweep.register_as:
        from cliplab.tracking.registry import register_checkpoint
        from cliplab.tracking.tracker import tracking_uri

        uri = tracking_uri(sweep.base.tracking)
        if uri and best.get("checkpoint_path"):
            registered = register_checkpoint(best["checkpoint_path"], sweep.register_as, sweep.alias,
                                             uri=uri, run_id=best.get("mlflow_run_id") or None)
    return SweepOutcome(rows, best, registered, errors)
