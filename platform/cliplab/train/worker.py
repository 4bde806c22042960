"""The per-worker training loop: the only place that calls ``ray.train``."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import torch

from cliplab import checkpoint as ckpt
from cliplab.config import ExperimentConfig, flatten, from_dict, to_dict
from cliplab.data import plan
from cliplab.distributed import DistContext
from cliplab.eval import evaluate_module
from cliplab.models import build_dual_encoder
from cliplab.tracking import build_tracker
from cliplab.tracking.artifacts import plot_curves, provenance, write_config, write_eval_report
from cliplab.train.metering import Throughput, count_flops
from cliplab.train.protocol import STOPPED, data_changed_message
from cliplab.train.schedule import build_scheduler, restore_scheduler
from cliplab.train.step import (
    CheckpointTimer,
    NonFiniteGuard,
    NonFiniteLossError,
    build_optimizer,
    configure_device,
    grad_scaler,
    resolve_precision,
    train_step,
    unwrap,
)


def _persist_checkpoint(checkpoint, dir_name: str):
    """Ray Train's ``checkpoint_upload_fn``: on an object store, copy the checkpoint's files with
    :func:`~cliplab.data.sources.put_file`, which raises when a file does not arrive whole.
    Ray's default upload (pyarrow's ``copy_files``) only logs a failed S3 part upload, so a lost
    checkpoint was reported as saved; now the worker fails and ``train.max_failures`` applies.
    The ``COMPLETE`` marker goes last, so a checkpoint cut off mid-upload never looks complete.

    On a local or shared (NFS) folder Ray's own copy is kept (it also checks that this worker sees
    the driver's folder, which a local path on a multi-node cluster would not), but it copies the
    files in no fixed order: the marker is held back from it, each copied file's size is checked,
    and only then is the marker written (to a temporary name, then renamed)."""
    import ray.train

    from cliplab.data.sources import OBJECT_STORES, put_files

    storage = ray.train.get_context().get_storage()  # Ray's DeveloperAPI: the run's filesystem and paths
    if storage.storage_filesystem.type_name not in OBJECT_STORES:
        return _persist_to_folder(storage, checkpoint, dir_name)
    dest = storage.build_checkpoint_path_from_name(dir_name)
    local = Path(checkpoint.path)
    storage.storage_filesystem.create_dir(dest)  # as Ray's own upload does
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == ckpt.MARKER, str(p)))
    put_files(storage.storage_filesystem, local, files, dest)
    return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)


def _persist_to_folder(storage, checkpoint, dir_name: str):
    """:func:`_persist_checkpoint` on a local or shared folder: everything but the marker by Ray's
    copy, each file's size verified, then the marker, atomically."""
    from cliplab.data.sources import put_file

    local = Path(checkpoint.path)
    marker = local / ckpt.MARKER
    held = marker.read_bytes() if marker.is_file() else None
    marker.unlink(missing_ok=True)  # Ray copies the rest, in its own order
    persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
    filesystem, dest = storage.storage_filesystem, persisted.path
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target = f"{dest}/{f.relative_to(local).as_posix()}"
        stored = filesystem.get_file_info(target).size
        if stored != f.stat().st_size:
            raise OSError(f"{target} holds {stored} bytes after copying {f.stat().st_size} bytes from {f}")
    if held is not None:
        marker.write_bytes(held)
        put_file(filesystem, marker, f"{dest}/.{ckpt.MARKER}.tmp")
        filesystem.move(f"{dest}/.{ckpt.MARKER}.tmp", f"{dest}/{ckpt.MARKER}")  # a rename: all or nothing
    return persisted


def _evaluate(model, bundle, cfg: ExperimentConfig) -> dict[str, float]:
    import ray.train

    val = ray.train.get_dataset_shard("val") if cfg.data.val else None
    if val is None:
        return {}
    from collections import Counter

    from cliplab.data.pipeline import good_rows, skip_metrics

    skipped: Counter = Counter()  # val samples and shards the shared decoder skipped, by reason
    batches = good_rows(val.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"), skipped)
    metrics = evaluate_module(unwrap(model), bundle.tokenizer, batches, cfg.eval.templates)
    return {**metrics, **skip_metrics(skipped)}


def _device() -> torch.device:
    import ray.train.torch

    from cliplab.train.protocol import worker_sees_cuda

    device = ray.train.torch.get_device()
    if device.type == "cuda" and not worker_sees_cuda():
        return torch.device("cpu")  # a simulated GPU node (RAY_FAKE_CLUSTER): the same run, on the CPU
    return device


def train_loop_per_worker(config: dict) -> dict | None:
    import ray.train
    import ray.train.torch

    logging.getLogger("root").setLevel(logging.WARNING)  # open_clip logs model creation at INFO
    cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed)
    device = _device()
    precision = resolve_precision(cfg.train.precision, device)
    scaler = grad_scaler(precision, device)

    bundle, module = build_dual_encoder(cfg)  # pretrained temperature taken, towers locked: before DDP
    frozen = sorted(name for name, p in module.named_parameters() if not p.requires_grad)
    if cfg.train.grad_checkpointing:
        module.model.set_grad_checkpointing(True)
    configure_device(device, tf32=cfg.train.tf32)
    module.to(device)  # before the optimizer, which picks its fused kernel by the parameters' device
    optimizer = build_optimizer(module, cfg.optim)
    total_steps = cfg.train.max_steps or cfg.train.epochs * config["steps_per_epoch"]
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    step, start_epoch, run_id, data_position = 0, 0, None, None
    resume = ray.train.get_checkpoint()
    if resume is not None:  # a FailureConfig restart or `cliplab train --resume`
        with resume.as_directory() as d:
            try:
                ckpt.load_weights(Path(d), module)
                state = ckpt.load_trainer_state(Path(d))
            except ckpt.UnsafeCheckpointError as err:  # the same on every rank and every retry: no restart
                return {STOPPED: str(err), "step": 0}
        if state.get("frozen", frozen) != frozen:  # the optimizer's state would not fit its parameters
            return {STOPPED: f"{resume.path} was trained with other frozen parameters (model.lock_*): "
                             "resume it with the model.lock_* settings of its config.json", "step": 0}
        optimizer.load_state_dict(state["optimizer"])
        step, start_epoch, run_id = state["step"], state["epoch"], state.get("mlflow_run_id")
        restore_scheduler(scheduler, state["scheduler"], step)  # a changed budget never raises the lr
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        data_position = state.get("data_position")  # continue at the next unseen sample of the epoch
        ckpt.restore_rng(state)
    if cfg.train.compile:
        module.compile_encoders()
    model = ray.train.torch.prepare_model(module, move_to_device=device)
    ctx = DistContext.current()
    data = _train_stream(cfg, config["steps_per_epoch"], rank, ctx.world_size, device)
    fingerprint = plan.fingerprint(data.index, cfg.data)  # saved with each checkpoint's data position
    if resume is not None:
        changed = plan.data_changes(state.get("data_fingerprint") or fingerprint, fingerprint)
        if changed and not config.get("allow_data_change"):
            return {STOPPED: data_changed_message(resume.path, state["step"], changed), "step": step}
        if changed:
            logging.getLogger(__name__).warning("resuming on changed data (%s): the saved data position is "
                                                "applied to the new plan", "; ".join(changed))

    trial = config.get("trial_name") or cfg.tracking.run_name or cfg.name
    tracker = build_tracker(cfg.tracking, rank=rank, run_name=trial, run_id=run_id,
                            tags={"objective": cfg.objective.name, "model": cfg.model.name,
                                  "dataset": cfg.data.describe_train(), "sweep": config.get("sweep", ""),
                                  **({"mlflow.parentRunId": config["parent_run_id"]}
                                     if config.get("parent_run_id") else {})})
    if run_id is None:
        tracker.log_params({**flatten(to_dict(cfg)), "train.world_size": ctx.world_size,
                            "train.precision_resolved": precision, **(config.get("provenance") or provenance())})
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_config(to_dict(cfg), Path(tmp)):
                tracker.log_artifact(path)
    if resume is not None:  # visible in MLflow: where each restart picked the run up
        tracker.log_metrics({"train/resumed_from_step": float(step)}, step)
    history: list[tuple[int, dict[str, float]]] = []  # rank 0's logged metrics, for the curves plot
    monitor = _start_system_metrics(cfg, tracker)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    timer = CheckpointTimer(cfg.train.checkpoint_every, cfg.train.checkpoint_every_minutes, ctx)
    stopped: str | None = None  # why the run ends early, for good (no Ray restart would help)

    def log(metrics: dict[str, float]) -> None:
        if rank == 0:
            history.append((step, dict(metrics)))
        tracker.log_metrics(metrics, step)

    def report(metrics: dict, with_checkpoint: bool, epoch: int) -> None:
        metrics = {**metrics, "step": step, "epoch": epoch, "mlflow_run_id": getattr(tracker, "run_id", None) or ""}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        position = data.state()  # a collective: every rank's data position
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.save_checkpoint(Path(tmp), unwrap(model), optimizer, scheduler, step=step, epoch=epoch,
                                     cfg=cfg, extra={"mlflow_run_id": getattr(tracker, "run_id", None),
                                                     "data_position": position, "data_fingerprint": fingerprint,
                                                     "frozen": frozen,
                                                     "scaler": scaler.state_dict() if scaler is not None else None})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=_persist_checkpoint)
        timer.done()

    data.restore(data_position)
    meter = Throughput(ctx.world_size)
    step_kwargs = {"accum_steps": cfg.train.accum_steps, "grad_clip_norm": cfg.optim.grad_clip_norm,
                   "precision": precision, "scaler": scaler}
    flops_per_step: float | None = None
    metrics: dict[str, float] = {}
    epoch = start_epoch
    while epoch < cfg.train.epochs and step < total_steps:
        batches = data.batches(epoch)
        meter.start_epoch()
        for batch in meter.timed(batches):
            step_fn = functools.partial(train_step, model, batch, optimizer, scheduler, ctx, **step_kwargs)
            if flops_per_step is None:  # count FLOPs once, on the first step
                metrics, flops_per_step = count_flops(step_fn)
            else:
                metrics = step_fn()
            meter.step_done(len(batch["image"]))
            try:
                skipped = guard.update(metrics, step)
            except NonFiniteLossError as err:  # every rank at once: the finite flag is all-reduced
                stopped = str(err)
                break
            if skipped:
                log({"train/nonfinite_skipped": float(guard.total)})
                continue
            step += 1
            if step % cfg.train.log_every == 0:
                metrics.update(meter.metrics(flops_per_step, device, cfg.train.peak_tflops))
                metrics["train/nonfinite_skipped"] = float(guard.total)
                metrics.update(data.metrics())  # data/skipped/<reason>, summed over ranks
                log(metrics)
            if step >= total_steps:
                break
            if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0:
                log(_evaluate(model, bundle, cfg) if rank == 0 else {})
            if timer.due(step):
                report(metrics, with_checkpoint=True, epoch=epoch)
        if stopped is not None:
            break
        if step < total_steps:
            epoch += 1  # a full pass; a run stopped by max_steps resumes inside the same epoch
        last = epoch >= cfg.train.epochs or step >= total_steps
        log(data.metrics())
        if cfg.train.eval_every_epoch or last:
            metrics = {**metrics, **(_evaluate(model, bundle, cfg) if rank == 0 else {})}
            log({k: v for k, v in metrics.items() if k.startswith("val/")})
        if not last:
            report(metrics, with_checkpoint=False, epoch=epoch)
    if stopped is not None:
        # an error that a restart would only repeat: end cleanly (Ray Train retries only failed
        # workers), keep the last good checkpoint, mark the MLflow run FAILED with its spool
        # flushed; the driver turns the return value into the error (launch.raise_if_stopped)
        if monitor is not None:
            _stop_system_metrics(monitor)
        tracker.set_tags({"cliplab.stopped": stopped})
        tracker.finish("FAILED")
        return {STOPPED: stopped, "step": step}
    # the final report always carries a checkpoint (what sweeps register) and the final eval
    report(metrics, with_checkpoint=True, epoch=epoch)
    if rank == 0:
        _log_run_artifacts(tracker, metrics, history, title=f"{trial} ({cfg.objective.name})")
    if monitor is not None:
        _stop_system_metrics(monitor)
    tracker.finish()
    return None


def _train_stream(cfg: ExperimentConfig, steps_per_epoch: int, rank: int, world: int, device):
    """This rank's :class:`~cliplab.data.stream.RankStream`, from the shard index every worker gets."""
    import ray
    import ray.train

    from cliplab.data.stream import RankStream, index_from_rows
    from cliplab.objectives import resolve

    index = index_from_rows(ray.train.get_dataset_shard("train_index").iter_rows())
    views, captions_ref = 1, None
    if resolve(cfg.objective).targets == "soft":  # X-CLR: caption embeddings joined by key, maybe two views
        from cliplab.data.captions import load_caption_table

        captions_ref = ray.put(load_caption_table(cfg.data.caption_embeddings, cfg.data.s3))
        views = 2 if cfg.objective.soft_target_views == "image_image" else 1
    return RankStream(index, cfg.data, cfg.model.name, rank=rank, world=world, steps=steps_per_epoch,
                      device=device, views=views, captions_ref=captions_ref)


def _start_system_metrics(cfg: ExperimentConfig, tracker):
    """MLflow's CPU/memory/GPU sampler (``system/*``) on the tracked rank, when enabled."""
    uri = getattr(tracker, "uri", None)
    if not (cfg.tracking.system_metrics and uri and getattr(tracker, "run_id", None)):
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=10.0, samples_before_logging=1,
                                       tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:  # noqa: BLE001 - system metrics are a nice-to-have, never fatal
        logging.getLogger(__name__).warning("MLflow system metrics are off: %s", err)
        return None


def _stop_system_metrics(monitor) -> None:
    """Stop the sampler, then publish what it sampled since its last publish plus one last sample.

    MLflow's monitor publishes only after a full sampling interval and drops its pending samples on
    ``finish()``, so without this a run shorter than the interval would have no ``system/*`` at all.
    """
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - system metrics are a nice-to-have, never fatal
        logging.getLogger(__name__).warning("MLflow system metrics: the last sample was not logged: %s", err)


def _log_run_artifacts(tracker, metrics: dict[str, float], history, *, title: str) -> None:
    """The eval report (JSON + Markdown) and the learning curves (PNG) of a finished run."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_eval_report(metrics, Path(tmp), title=title):
            tracker.log_artifact(path, "eval")
        plot = plot_curves(history, Path(tmp) / "learning_curves.png", title=title)
        if plot is not None:
            tracker.log_artifact(plot, "plots")
