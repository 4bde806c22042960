"""Turn a validated config into a Ray Train ``TorchTrainer`` and run it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplab.config import ExperimentConfig, to_dict
from cliplab.data.sources import ShardSet, resolve_shards
from cliplab.errors import DataError, TrainingError
from cliplab.ray_connect import init_ray
from cliplab.tracking.tracker import check_reachable, tracking_uri
from cliplab.train.protocol import STOPPED, data_changed_message, worker_sees_cuda

# Ray Train settings that cliplab's runs default to (a value already in the environment wins;
# Ray passes them from the process that calls ``fit`` on to the controller and the workers):
# - the controller polls its workers every 2 s by default, so the start, each report and the end
#   of every run wait for the next poll (up to 2 s each; bench/ray_train_startup.py measures it);
# - the preemption watcher, one more actor process per run, only logs node drains for
#   ``ray.train.get_preemption_info``, which cliplab does not read (a drained node's workers die
#   and the run restarts from its last checkpoint either way), and its start logs an error line.
# Measured in docs/PERFORMANCE.md ("Ray Train's own start and end").
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass(frozen=True)
class Prepared:
    """Everything checked in the driver before Ray work: shards and the tracking server.
    ``train`` lists every training shard; ``sources`` holds them per weighted source."""

    cfg: ExperimentConfig
    train: ShardSet
    val: ShardSet | None
    sources: tuple[ShardSet, ...] = ()


def preflight(cfg: ExperimentConfig) -> Prepared:
    """Resolve shards and ping MLflow: fails in seconds, with one line, before any Ray work
    (a missing bucket or shard, rejected credentials, an unreachable endpoint)."""
    sources = tuple(resolve_shards(s.url, cfg.data.s3) for s in cfg.data.train_sources())
    if not sources:
        raise DataError("no training data: set data.train or data.sources")
    train = sources[0] if len(sources) == 1 else ShardSet(
        cfg.data.describe_train(), tuple(p for s in sources for p in s.paths), sources[0].filesystem)
    val = resolve_shards(cfg.data.val, cfg.data.s3) if cfg.data.val else None
    check_reachable(tracking_uri(cfg.tracking))
    return Prepared(cfg, train, val, sources)


_INDEXES: dict[tuple, Any] = {}


def train_index(cfg: ExperimentConfig, prep: Prepared | None = None):
    """The :class:`~cliplab.data.index.TrainIndex` of the training sources (built once per
    process, and per shard cached on disk), resolving the sources again if ``prep`` lacks them."""
    from cliplab.data.decode import Limits
    from cliplab.data.index import build_train_index, subsample

    specs = cfg.data.train_sources()
    limits = Limits.of(cfg.data)
    key = (tuple((s.url, s.weight, s.name) for s in specs), cfg.data.s3, limits,
           cfg.data.train_fraction, cfg.data.train_fraction_seed)
    if key not in _INDEXES:
        sets = prep.sources if prep is not None and len(prep.sources) == len(specs) else \
            tuple(resolve_shards(s.url, cfg.data.s3) for s in specs)
        full = build_train_index([(s.name, s.weight, shards) for s, shards in zip(specs, sets, strict=True)],
                                 limits=limits)
        _INDEXES[key] = subsample(full, cfg.data.train_fraction, cfg.data.train_fraction_seed)
    return _INDEXES[key]


def storage_path(cfg: ExperimentConfig) -> str:
    path = cfg.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def storage_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """``storage_path`` for Ray Train; an ``s3://`` path goes through cliplab's S3 filesystem
    (pyarrow ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly)."""
    path = storage_path(cfg)
    if path.startswith("s3://"):
        from cliplab.checkpoint import run_storage

        filesystem, root = run_storage(path, cfg.data.s3)
        return {"storage_path": root, "storage_filesystem": filesystem}
    return {"storage_path": path}


def build_datasets(prep: Prepared) -> dict[str, Any]:
    """What the workers read: ``train_index``, the shard index in the object store (every worker
    gets it whole: each rank reads its own deterministic samples, see :mod:`cliplab.data.stream`),
    and, when the workers may decode in Ray Data tasks (``data.decode_on``), the ``val`` Ray Dataset.
    Workers that decode themselves read val in process, so a CPU run starts no Ray Data at all."""
    import ray
    import ray.data

    from cliplab.data.decode import Limits
    from cliplab.data.pipeline import build_val_dataset

    cfg = prep.cfg
    datasets: dict[str, Any] = {"train_index": ray.put(train_index(cfg, prep))}
    tasks = cfg.data.decode_on == "tasks" or (cfg.data.decode_on == "auto" and cfg.train.use_gpu)
    if prep.val is not None and tasks:
        val = build_val_dataset(prep.val, model_name=cfg.model.name, label_key=cfg.data.label_key,
                                cpus_per_task=cfg.data.cpus_per_task, limits=Limits.of(cfg.data))
        val.context.enable_progress_bars = False  # a small read, once per eval: the worker prints one line an epoch
        datasets["val"] = val
    return datasets


def steps_per_epoch(cfg: ExperimentConfig, prep: Prepared | None = None) -> int:
    """Optimizer steps per epoch: every rank gets an equal slice of the epoch's samples and
    drops its last partial batch. Counts usable samples from the shard index (after
    ``data.train_fraction``), so it depends on the data keys, the batch and the workers."""
    from cliplab.data import plan

    index = train_index(cfg, prep)
    steps = plan.steps_per_epoch(index, cfg.train.num_workers, cfg.data.batch_size)
    if steps < 1:
        rows = int(index.counts().sum())
        raise DataError(f"{cfg.data.describe_train()}: {rows} readable samples are fewer than one batch of "
                        f"{cfg.data.batch_size} per worker × {cfg.train.num_workers} workers; "
                        "lower data.batch_size or add data")
    return steps


def planned_steps(cfg: ExperimentConfig, prep: Prepared | None = None) -> int:
    """The step a run of ``cfg`` ends at when nothing stops it early: ``train.max_steps``, or
    the end of ``train.epochs``, whichever comes first."""
    by_epochs = cfg.train.epochs * steps_per_epoch(cfg, prep)
    return min(cfg.train.max_steps, by_epochs) if cfg.train.max_steps else by_epochs


def build_trainer(prep: Prepared, *, name: str, datasets: dict[str, Any], steps: int,
                  callbacks: list | None = None, extra: dict[str, Any] | None = None):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cliplab.tracking.artifacts import provenance

    cfg = prep.cfg
    for key, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(key, value)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    refs = {name: ref for name, ref in datasets.items() if isinstance(ref, ray.ObjectRef)}  # the shard index
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "steps_per_epoch": steps, "started_at": time.time(),
                           "provenance": provenance(), "refs": refs, **(extra or {})},
        torch_config=gpu_torch_config() if cfg.train.use_gpu else TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            **storage_kwargs(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or [],
        ),
        datasets={name: ds for name, ds in datasets.items() if name not in refs},
        # split none: every worker reads the whole val set (retrieval ranks against all of it);
        # Ray's default ("all") would hand each worker a slice
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest_options()),
    )


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train's per-worker function: the loop in :mod:`cliplab.train.worker`, imported here, in the
    worker. Ray Train's controller (and a Tune trial's driver) unpickle this function by reference,
    so its module must stay light: importing the worker module there (open_clip, transformers,
    torchvision) would add about 1.7 s of CPU to every run's start-up, on its critical path."""
    from cliplab.train.worker import train_loop_per_worker as loop

    return loop(config)


def ingest_options():
    """Ray Train's default ingest options (``DataConfig.default_ingest_options``: the current
    ``DataContext``'s) without the deprecated ``exclude_resources`` that Ray's default passes and
    warns about once per run."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    opts = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=opts.resource_limits, preserve_order=opts.preserve_order,
                            verbose_progress=opts.verbose_progress)


def gpu_torch_config():
    """Ray's :class:`TorchConfig` for GPU workers, whose collective backend is decided when the
    worker group starts: NCCL where the workers see CUDA, gloo on simulated GPU nodes."""
    import dataclasses

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _GpuBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            cuda = worker_group.execute_single(0, worker_sees_cuda)
            super().on_start(worker_group, dataclasses.replace(backend_config, backend="nccl" if cuda else "gloo"))

    @dataclasses.dataclass
    class GpuTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _GpuBackend

    return GpuTorchConfig()


def unique_name(stem: str) -> str:
    """A fresh run name: Ray Train resumes a run whose name already exists in storage."""
    import time

    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg: ExperimentConfig, *, address: str | None = None, name: str | None = None,
                 allow_data_change: bool = False):
    """``cliplab train``: preflight, then one TorchTrainer run. Returns the Ray Train Result;
    raises :class:`TrainingError` when the workers fail for good or the run stops early (a NaN
    streak), and a :class:`DataError` when the run to resume was trained on other data."""
    from ray.train import TrainingFailedError

    prep = preflight(cfg)
    name = name or unique_name(cfg.name)
    check_resume(cfg, name, train_index(cfg, prep), allow_data_change=allow_data_change)
    init_ray(address)
    datasets = build_datasets(prep)
    steps = steps_per_epoch(cfg, prep)
    trainer = build_trainer(prep, name=name, datasets=datasets, steps=steps,
                            extra={"allow_data_change": allow_data_change})
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        raise TrainingError(f"run '{name}' failed after {cfg.train.max_failures} restart(s): {failure_summary(err)}. "
                            f"Once that is fixed, continue from its last complete checkpoint with `cliplab train "
                            f"--resume {name} --storage-path {cfg.storage_path}` (worker logs: Ray dashboard)") from None
    raise_if_stopped(result, name, cfg)
    return result


def raise_if_stopped(result, name: str, cfg: ExperimentConfig) -> None:
    """The workers stop a run that a restart would only repeat (a NaN streak, a refused
    checkpoint, changed data) by returning the reason instead of raising it: Ray Train retries
    every worker error (its failure policy has no non-retryable kind) and keeps only a clean
    return's value (``Result.return_value``, rank 0's). Here it becomes the one-line
    :class:`TrainingError`."""
    stopped = result.return_value if isinstance(result.return_value, dict) else {}
    reason = stopped.get(STOPPED)
    if reason:
        raise TrainingError(f"run '{name}' stopped at step {stopped.get('step')}, without a restart: "
                            f"{reason} (resume with `cliplab train --resume {name} --storage-path "
                            f"{cfg.storage_path}`)")


def check_resume(cfg: ExperimentConfig, name: str, index, *, allow_data_change: bool = False) -> None:
    """Before Ray resumes run ``name`` (it does when the name has a checkpoint in storage): its
    latest complete checkpoint's trainer state must load safely (tensors and plain types only)
    and, unless ``allow_data_change``, must have been trained on the same shards and plan."""
    from cliplab.checkpoint import latest_in_storage, read_trainer_state
    from cliplab.data import plan

    found = latest_in_storage(f"{storage_path(cfg).rstrip('/')}/{name}", cfg.data.s3)
    if found is None:
        return
    state = read_trainer_state(*found)
    saved = state.get("data_fingerprint")
    if saved is None or allow_data_change:
        return  # a checkpoint from before fingerprints: nothing to compare
    changes = plan.data_changes(saved, plan.fingerprint(index, cfg.data))
    if changes:
        raise DataError(data_changed_message(found[1], state.get("step", "?"), changes))


def failure_summary(err: BaseException) -> str:
    """One line per failed rank: the exception that ended it (not Ray's traceback snippet)."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        cause = getattr(err, "controller_failure", None) or err
        return f"{type(cause).__name__}: {_last_line(cause)}"
    parts = []
    for rank, exc in sorted(failures.items()):
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's own exception
        parts.append(f"rank {rank}: {type(cause).__name__}: {_last_line(cause)}")
    return "; ".join(parts)


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""
