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
from typing import Any, Protocol

from cliplab.config import ExperimentConfig, load_python_file, parse_override, validate, with_overrides
from cliplab.errors import ConfigError
from cliplab.tune.capacity import SCALE_UP_TIMEOUT_ENV, TRIAL_DRIVER

#: the least time between the driver's uploads of trial results and TensorBoard event files to
#: remote storage (Tune's default is 300 s): most of what `cliplab dashboard` on an S3 sweep lags by
SYNC_PERIOD_S = 30


class Scheduler(Protocol):
    """Builds a Tune trial scheduler for a sweep (metric, mode and the epoch budget known)."""

    def build(self, metric: str, mode: str, max_epochs: int): ...


@dataclass(frozen=True)
class ASHA:
    """Asynchronous successive halving over epochs: at each rung (``grace_period`` epochs, then
    × ``reduction_factor``) a trial continues only if it is in the top 1/``reduction_factor`` of
    the trials that reached that rung. Trials must evaluate each epoch (``train.eval_every_epoch``)."""

    grace_period: int = 1
    reduction_factor: float = 2.0

    def build(self, metric: str, mode: str, max_epochs: int):
        from ray.tune.schedulers import ASHAScheduler

        # metric and mode come from TuneConfig (Tune refuses them twice)
        return ASHAScheduler(time_attr="epoch", max_t=max(max_epochs, 1), grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor)


@dataclass(frozen=True)
class NoScheduler:
    """Every trial runs its full budget (FIFO)."""

    def build(self, metric: str, mode: str, max_epochs: int):
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()


class SearchAlgorithm(Protocol):
    """Proposes each trial's values from the search space (metric and mode known)."""

    def build(self, metric: str, mode: str): ...

    def check(self, space: dict[str, Any]) -> None:
        """Refuse a space this algorithm cannot search (before any Ray work)."""

    def concurrent(self, fits: int) -> int:
        """How many trials to run at once when the sweep leaves it open and ``fits`` fit the cluster."""


@dataclass(frozen=True)
class RandomSearch:
    """Tune's basic variant generator: grids are crossed, distributions sampled at random."""

    def build(self, metric: str, mode: str):
        return None

    def check(self, space: dict[str, Any]) -> None:
        return None

    def concurrent(self, fits: int) -> int:
        return fits  # its proposals do not depend on results: fill the cluster


@dataclass(frozen=True)
class Optuna:
    """Optuna's TPE sampler proposes each trial from the results of those before it (set
    ``max_concurrent_trials`` low so that it has results to learn from). Distributions and
    ``tune.choice`` only: a ``grid_search`` key is refused."""

    seed: int | None = 0

    def build(self, metric: str, mode: str):
        import optuna

        from cliplab.tune.optuna_search import MetricOnlyOptunaSearch

        return MetricOnlyOptunaSearch(sampler=optuna.samplers.TPESampler(seed=self.seed))

    def check(self, space: dict[str, Any]) -> None:
        for key, domain in space.items():
            if isinstance(domain, dict) and "grid_search" in domain:
                raise ConfigError(f"search space '{key}': Optuna samples distributions and cannot search a "
                                  "grid_search; use tune.choice([...]) instead")

    def concurrent(self, fits: int) -> int:
        return 1  # each proposal learns from every finished trial


@dataclass(frozen=True)
class Sweep:
    """A question as code. The sweep file's docstring states the hypothesis.

    ``space`` maps dotted config keys to Ray Tune domains (``tune.grid_search``, ``tune.choice``,
    ``tune.uniform``, ``tune.loguniform``, ``tune.randint``) or plain values; grids are crossed and
    distributions sampled at random ``num_samples`` times (Tune's basic variant generator).
    ``scheduler`` is :class:`ASHA` (early stopping, the default) or :class:`NoScheduler`;
    ``search`` is :class:`RandomSearch` (the default) or :class:`Optuna`. Each trial
    takes ``train.num_workers`` × (``train.cpus_per_worker`` CPUs, ``train.gpus_per_worker`` GPUs);
    ``max_concurrent_trials`` of them must fit the cluster it can scale to (checked before launching;
    on an autoscaling cluster the sweep waits up to ``scale_up_timeout_s`` for one trial to fit).
    ``max_concurrent_trials`` None (the default) runs as many trials at once as the cluster holds
    when the sweep starts (Ray Tune's own default packs trials the same way): on 2 CPUs, three
    trials of 1 worker × 0.5 CPU (each trial's driver holds 0.01 CPU). Optuna runs one at a time
    unless told otherwise. On a cluster that autoscales from zero, set it to what the fleet holds.
    """

    base: ExperimentConfig
    space: dict[str, Any]
    metric: str = "val/image_to_text_R1"
    mode: str = "max"
    num_samples: int = 1
    max_concurrent_trials: int | None = None  # None: as many as the cluster holds (see above)
    register_as: str | None = None  # MLflow registered model name for the best trial
    alias: str = "champion"
    hypothesis: str = ""
    name: str = "sweep"
    summarize: Callable[[list[dict[str, Any]]], str] | None = None  # extra report from the rows
    scheduler: Scheduler = field(default_factory=ASHA)
    search: SearchAlgorithm = field(default_factory=RandomSearch)
    # an autoscaling cluster (KubeRay's GPU group starts at 0 replicas): how long to wait for it to
    # hold one trial before giving up, and the largest node it scales to (for the "can never fit"
    # check when the autoscaler's node types are not readable; see cliplab.tune.capacity)
    scale_up_timeout_s: float = field(default_factory=lambda: float(os.environ.get(SCALE_UP_TIMEOUT_ENV, 900)))
    max_node_resources: dict[str, float] | None = None
    tune_verbose: int = 0  # Ray Tune's own output: 0 one line per trial start and end, 1 also its tables, 2 more

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
    files: dict[str, Path] = field(default_factory=dict)  # results table (csv, md) and plots
    parent_run_id: str | None = None
    registration_error: str | None = None  # the best trial trained but could not be registered
    summary: str | None = None  # the sweep's own summarize(rows), computed once (None: not yet)


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
    if not sweep.scale_up_timeout_s > 0:
        raise ConfigError(f"{path}: scale_up_timeout_s must be > 0 seconds, got {sweep.scale_up_timeout_s}")
    if sweep.mode not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be 'max' or 'min'")
    sweep.search.check(sweep.space)
    for values in _enumerable_points(sweep.space):
        validate(with_overrides(base, values))
    validate(base)
    return sweep


def _enumerable_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """One override dict per listed value (grid/choice), the rest sampled once, to validate keys
    and values before launching anything."""
    points: list[dict[str, Any]] = []
    for key, domain in space.items():
        lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
        if lower is not None and upper is not None and not lower < upper:
            raise ConfigError(f"search space '{key}': empty range [{lower}, {upper}); the lower bound must be "
                              "below the upper")
        if isinstance(domain, dict) and "grid_search" in domain:
            if not domain["grid_search"]:
                raise ConfigError(f"search space '{key}': grid_search needs at least one value")
            values = domain["grid_search"]
        elif hasattr(domain, "categories"):
            values = domain.categories
        elif hasattr(domain, "sample"):
            values = [domain.sample()]
        else:
            values = [domain]
        points.extend({key: v} for v in values)
    return points


def _trial(params: dict[str, Any], *, base: ExperimentConfig, prep_fields: dict, sweep: str,
           parent_run_id: str | None, allow_data_change: bool = False) -> None:
    """The Tune trainable: one TorchTrainer per trial, reporting through TuneReportCallback.
    Its Ray Train run is named after the trial, so a restarted trial resumes from its checkpoint.
    Its steps per epoch are its own: a trial may change the batch, the workers or the data."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cliplab.train.launch import Prepared, build_datasets, build_trainer, steps_per_epoch
    from cliplab.train.protocol import STOPPED

    cfg = with_overrides(base, params)
    trial = tune.get_context().get_trial_name()
    prep = Prepared(cfg=cfg, **prep_fields)
    trainer = build_trainer(prep, name=f"{sweep}-{trial}", datasets=build_datasets(prep),
                            steps=steps_per_epoch(cfg, prep),
                            callbacks=[TuneReportCallback()],
                            extra={"trial_name": trial, "sweep": sweep, "parent_run_id": parent_run_id,
                                   "allow_data_change": allow_data_change})
    result = trainer.fit()
    stopped = result.return_value if isinstance(result.return_value, dict) else {}
    if stopped.get(STOPPED):  # a NaN streak or changed data: reported, not raised (Tune would retry an error)
        tune.report({STOPPED: stopped[STOPPED], "step": stopped.get("step", 0)})


def _upload(local_root: Path, files, folder: str, s3cfg) -> None:
    """Copy ``files`` (under ``local_root``) to ``folder`` on its storage, keeping their layout."""
    from cliplab.checkpoint import run_storage
    from cliplab.data.sources import put_files

    filesystem, root = run_storage(folder, s3cfg)
    put_files(filesystem, local_root, files, root)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def sweep_dir(sweep: Sweep) -> str:
    from cliplab.train.launch import storage_path

    return f"{storage_path(sweep.base).rstrip('/')}/{sweep.name}"


def run_sweep(sweep: Sweep, *, address: str | None = None, register: bool = True,
              resume: bool = False, allow_data_change: bool = False) -> SweepOutcome:
    """Run (or with ``resume`` continue) a sweep; then report, plot, log the parent MLflow run and
    register the best trial (champion only if it beats the current one, else challenger)."""
    from ray import tune

    from cliplab.ray_connect import init_ray
    from cliplab.train.launch import planned_steps, preflight, storage_kwargs
    from cliplab.tune.capacity import wait_for_capacity
    from cliplab.tune.parent import ParentRun
    from cliplab.tune.report import summary_text

    prep = preflight(sweep.base)
    # checkpoint and per-epoch reports come before the first eval, so not every result has the metric
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(address)
    sweep = dataclasses.replace(sweep, max_concurrent_trials=concurrent_trials(sweep))
    wait_for_capacity(sweep.base, sweep.max_concurrent_trials, timeout_s=sweep.scale_up_timeout_s,
                      max_node=sweep.max_node_resources)
    planned_steps(sweep.base, prep)  # the base's index, on the driver: fewer samples than a batch fail here
    storage = storage_kwargs(sweep.base)
    path = sweep_dir(sweep)
    parent = ParentRun.open(sweep, path, resume=resume)
    # no resolved sources in prep_fields: a trial may change data.train, so it resolves its own
    trainable = tune.with_resources(tune.with_parameters(
        _trial, base=sweep.base, prep_fields={"train": prep.train, "val": prep.val}, sweep=sweep.name,
        parent_run_id=parent.run_id, allow_data_change=allow_data_change), TRIAL_DRIVER)
    grid = _tuner(sweep, trainable, path, storage, resume=resume).fit()
    rows, errors, curves = _collect(grid, sweep, total=lambda params: planned_steps(with_overrides(sweep.base, params)))
    best = _best(rows, sweep)
    if best is None:
        errors = errors or ["no trial reported the metric " + sweep.metric]
    summary = summary_text(sweep, rows)  # once: results.md and the terminal share it
    files = _write_results(sweep, rows, curves, path, errors, summary)
    registered, registration_error = None, None
    if best is not None and register and sweep.register_as:
        registered, registration_error = register_best(sweep, best)
    parent.finish(sweep, rows, best, files, registered)
    return SweepOutcome(rows, best, registered, errors, files=files, parent_run_id=parent.run_id,
                        registration_error=registration_error, summary=summary)


def concurrent_trials(sweep: Sweep) -> int:
    """``sweep.max_concurrent_trials``, or when it is None as many trials as the connected cluster
    holds now (:func:`~cliplab.tune.capacity.trials_that_fit`; one for a search that learns from
    finished trials, see :meth:`SearchAlgorithm.concurrent`), never more than the sweep's trials."""
    import ray

    from cliplab.tune.capacity import trials_that_fit

    trials = sweep.num_trials or sweep.num_samples
    if sweep.max_concurrent_trials is not None:
        return max(1, min(sweep.max_concurrent_trials, trials))
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    return sweep.search.concurrent(trials_that_fit(sweep.base, total, trials))


def register_best(sweep: Sweep, best: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Register and promote the best trial (:func:`cliplab.tune.promote.register_and_promote`).
    An MLflow that fails at this point costs the registration, not the sweep's results:
    ``(None, what happened and what to do)``."""
    from mlflow.exceptions import MlflowException

    from cliplab.tune.promote import register_and_promote

    try:
        return register_and_promote(sweep, best), None
    except (MlflowException, OSError) as err:  # requests' connection errors are OSErrors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return None, (f"registering the best trial {best.get('trial')} as '{sweep.register_as}' failed: {reason}. "
                      f"Its checkpoint is kept ({best.get('checkpoint_path')}); once MLflow answers, run the same "
                      "command again with --resume: finished trials are kept and the best one is registered")


def _tuner(sweep: Sweep, trainable, path: str, storage: dict, *, resume: bool):
    """A new ``Tuner`` for the sweep in ``storage`` (:func:`~cliplab.train.launch.storage_kwargs`),
    or with ``resume`` the interrupted one restored from there."""
    from ray import tune

    from cliplab.tune.progress import TrialLines

    if resume:
        # the experiment folder on its filesystem (for S3, the bucket/key path, without the scheme)
        restore_path = f"{storage['storage_path'].rstrip('/')}/{sweep.name}"
        if not tune.Tuner.can_restore(restore_path, storage_filesystem=storage.get("storage_filesystem")):
            raise ConfigError(f"nothing to resume at {path}: run the sweep without --resume first")
        return tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=sweep.space, storage_filesystem=storage.get("storage_filesystem"))
    return tune.Tuner(
        trainable,
        param_space=sweep.space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
            scheduler=sweep.scheduler.build(sweep.metric, sweep.mode, sweep.base.train.epochs),
            search_alg=sweep.search.build(sweep.metric, sweep.mode),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        # a trial whose driver died with its node starts again; its Ray Train run (named after
        # the trial) resumes from its latest checkpoint
        run_config=tune.RunConfig(name=sweep.name, sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
                                  failure_config=tune.FailureConfig(max_failures=sweep.base.train.max_failures),
                                  verbose=sweep.tune_verbose,
                                  callbacks=[TrialLines(sweep.space, sweep.metric, sweep.num_trials or sweep.num_samples)],
                                  **storage),
    )


def _collect(grid, sweep: Sweep, *, total: Callable[[dict], int]) -> tuple[list[dict], list[str], dict]:
    """One row per trial (its params, last metrics and ``stop_reason``: completed after
    ``total(params)`` steps, error, or stopped early), the errors, and each trial's metrics over time."""
    from cliplab.train.protocol import STOPPED

    rows, errors, curves = [], [], {}
    for result in grid:
        name = Path(result.path).name
        params = {k: result.config.get(k) for k in sweep.space}
        metrics = result.metrics or {}
        if result.error:
            errors.append(f"{name}: {result.error}")
            stop = "error"
        elif metrics.get(STOPPED):
            errors.append(f"{name}: stopped at step {metrics.get('step')}: {metrics[STOPPED]}")
            stop = "error"
        elif metrics.get("step", 0) >= total(params):
            stop = "completed"
        else:
            stop = f"stopped early at epoch {metrics.get('epoch', '?')}"
        rows.append({"trial": name, **params, **metrics, "stop_reason": stop})
        if result.metrics_dataframe is not None:
            curves[name] = result.metrics_dataframe
    return rows, errors, curves


def _best(rows: list[dict], sweep: Sweep) -> dict | None:
    """The row with the best metric among the completed trials (else among any that reported it)."""
    scored = [r for r in rows if isinstance(r.get(sweep.metric), (int, float)) and r["stop_reason"] == "completed"]
    scored = scored or [r for r in rows if isinstance(r.get(sweep.metric), (int, float))]
    if not scored:
        return None
    pick = max if sweep.mode == "max" else min
    return pick(scored, key=lambda r: r[sweep.metric])


def _write_results(sweep: Sweep, rows: list[dict], curves: dict, path: str, errors: list[str],
                   summary: str | None = None) -> dict:
    """The results table and plots in ``path`` (a remote ``path``: under ``.cliplab/sweeps/``, then
    uploaded beside the sweep's Tune state; a failed upload is appended to ``errors``)."""
    from cliplab.tune import report

    remote = "://" in path
    out = Path(".cliplab/sweeps") / sweep.name if remote else Path(path)
    files = report.write_results(sweep, rows, curves, out, summary)
    if remote:  # also beside the sweep's Tune state in the bucket
        try:
            _upload(out, files.values(), path, sweep.base.data.s3)
        except OSError as err:
            from cliplab.data.sources import s3_error_message

            errors.append(f"results kept only in {out}: {s3_error_message(err, path, sweep.base.data.s3)}")
    return files
