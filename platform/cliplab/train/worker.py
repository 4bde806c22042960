"""The per-worker training loop, the only place that calls ``ray.train``: :class:`Trainee` (build,
resume, wrap), :class:`Checkpointer` (reports and checkpoints), :class:`RunLog` and the loop itself."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliplab import checkpoint as ckpt
from cliplab.config import ExperimentConfig, flatten, from_dict, to_dict
from cliplab.data import plan
from cliplab.distributed import DistContext
from cliplab.eval import evaluate_module
from cliplab.models import build_dual_encoder
from cliplab.tracking import build_tracker
from cliplab.tracking.artifacts import plot_curves, provenance, write_config, write_eval_report
from cliplab.tracking.system_metrics import start_system_metrics, stop_system_metrics
from cliplab.train.metering import Throughput, count_flops
from cliplab.train.persist import persist_checkpoint
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


def _evaluate(t: Trainee) -> dict[str, float]:
    """Rank 0's val metrics (retrieval, zero-shot, lenses) and the val samples skipped, by reason."""
    import ray.train

    cfg = t.cfg
    if not cfg.data.val:
        return {}
    from collections import Counter

    from cliplab.data.pipeline import good_rows, skip_metrics

    if _decode_on(cfg, t.device) == "worker":  # in this process, like the training samples: no Ray Data start-up
        blocks = _val_blocks(cfg)
    else:
        blocks = ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy")
    skipped: Counter = Counter()  # val samples and shards the shared decoder skipped, by reason
    batches = good_rows(blocks, skipped)
    metrics = evaluate_module(unwrap(t.model), t.bundle.tokenizer, batches, cfg.eval.templates)
    return {**metrics, **skip_metrics(skipped)}


def _val_blocks(cfg: ExperimentConfig):
    """The val shards read and decoded here, shard by shard, by the val pipeline's own reader."""
    from cliplab.data.decode import Limits
    from cliplab.data.pipeline import read_val_shard
    from cliplab.data.sources import resolve_shards

    shards = resolve_shards(cfg.data.val, cfg.data.s3)
    for path in shards.paths:
        yield from read_val_shard({"path": [path]}, filesystem=shards.filesystem, prefix="s3://" if shards.is_s3 else "",
                                  model_name=cfg.model.name, label_key=cfg.data.label_key, limits=Limits.of(cfg.data))


def _decode_on(cfg: ExperimentConfig, device: torch.device) -> str:
    """Where this worker decodes (``data.decode_on``, ``auto`` resolved): ``tasks`` or ``worker``."""
    if cfg.data.decode_on != "auto":
        return cfg.data.decode_on
    return "tasks" if device.type == "cuda" else "worker"  # a GPU step leaves its worker's cores idle for tasks


def _device() -> torch.device:
    import ray.train.torch

    from cliplab.train.protocol import worker_sees_cuda

    device = ray.train.torch.get_device()
    if device.type == "cuda" and not worker_sees_cuda():
        return torch.device("cpu")  # a simulated GPU node (RAY_FAKE_CLUSTER): the same run, on the CPU
    return device


@dataclass
class Trainee:
    """What one worker trains, built before the loop: the model (DDP-wrapped once :meth:`wrap` ran),
    its optimizer, schedule and grad scaler, and where training stands (``step``, ``epoch``)."""

    cfg: ExperimentConfig
    rank: int
    device: torch.device
    precision: str
    scaler: Any
    bundle: Any
    module: Any
    optimizer: Any
    scheduler: Any
    frozen: list[str]
    total_steps: int
    model: Any = None
    step: int = 0
    epoch: int = 0

    @classmethod
    def build(cls, cfg: ExperimentConfig, steps_per_epoch: int) -> Trainee:
        import ray.train

        torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.train.seed)
        device = _device()
        precision = resolve_precision(cfg.train.precision, device)
        bundle, module = build_dual_encoder(cfg)  # pretrained temperature taken, towers locked: before DDP
        frozen = sorted(name for name, p in module.named_parameters() if not p.requires_grad)
        if cfg.train.grad_checkpointing:
            module.model.set_grad_checkpointing(True)
        configure_device(device, tf32=cfg.train.tf32)
        module.to(device)  # before the optimizer, which picks its fused kernel by the parameters' device
        optimizer = build_optimizer(module, cfg.optim)
        total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        return cls(cfg, ray.train.get_context().get_world_rank(), device, precision, grad_scaler(precision, device),
                   bundle, module, optimizer, build_scheduler(optimizer, cfg.optim, total_steps), frozen, total_steps)

    def resume(self, resume) -> dict | str:
        """Load a checkpoint (a FailureConfig restart or ``cliplab train --resume``) into the
        unwrapped module, optimizer, schedule, scaler and RNGs; its trainer state, or why not."""
        with resume.as_directory() as d:
            try:
                ckpt.load_weights(Path(d), self.module)
                state = ckpt.load_trainer_state(Path(d))
            except ckpt.UnsafeCheckpointError as err:  # the same on every rank and every retry: no restart
                return str(err)
        if state.get("frozen", self.frozen) != self.frozen:  # the optimizer's state would not fit its parameters
            return (f"{resume.path} was trained with other frozen parameters (model.lock_*): "
                    "resume it with the model.lock_* settings of its config.json")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        restore_scheduler(self.scheduler, state["scheduler"], self.step)  # a changed budget never raises the lr
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state)
        return state

    def wrap(self) -> None:
        import ray.train.torch

        if self.cfg.train.compile:
            self.module.compile_encoders()
        self.model = ray.train.torch.prepare_model(self.module, move_to_device=self.device)

    def step_fn(self, batch, ctx: DistContext):
        return functools.partial(train_step, self.model, batch, self.optimizer, self.scheduler, ctx,
                                 accum_steps=self.cfg.train.accum_steps, grad_clip_norm=self.cfg.optim.grad_clip_norm,
                                 precision=self.precision, scaler=self.scaler)


class RunLog:
    """Metrics to the tracker (every rank calls; the tracker logs rank 0's) and rank 0's history,
    for the curves plot."""

    def __init__(self, tracker, rank: int) -> None:
        self.tracker, self.rank, self.history = tracker, rank, []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.history.append((step, dict(metrics)))
        self.tracker.log_metrics(metrics, step)


class Checkpointer:
    """Reports to Ray Train, with a checkpoint when asked: weights, optimizer, schedule, scaler, the
    data position (a collective: every rank's) and what it is relative to. Rank 0 writes it."""

    def __init__(self, trainee: Trainee, data, fingerprint: dict, tracker, ctx: DistContext) -> None:
        self.t, self.data, self.fingerprint, self.tracker = trainee, data, fingerprint, tracker
        self.timer = CheckpointTimer(trainee.cfg.train.checkpoint_every, trainee.cfg.train.checkpoint_every_minutes, ctx)

    def due(self) -> bool:
        return self.timer.due(self.t.step)

    def report(self, metrics: dict, *, checkpoint: bool) -> None:
        import ray.train

        t = self.t
        run_id = getattr(self.tracker, "run_id", None)
        metrics = {**metrics, "step": t.step, "epoch": t.epoch, "mlflow_run_id": run_id or ""}
        if not checkpoint:
            ray.train.report(metrics)
            return
        position = self.data.state()  # a collective: every rank's data position
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if t.rank == 0:
                ckpt.save_checkpoint(Path(tmp), unwrap(t.model), t.optimizer, t.scheduler, step=t.step, epoch=t.epoch,
                                     cfg=t.cfg, extra={"mlflow_run_id": run_id, "data_position": position,
                                                       "data_fingerprint": self.fingerprint, "frozen": t.frozen,
                                                       "scaler": t.scaler.state_dict() if t.scaler is not None else None})
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved, checkpoint_upload_fn=persist_checkpoint)
        self.timer.done()


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train's per-worker function: build, resume, open the run, then the loop below."""
    import ray.train

    logging.getLogger("root").setLevel(logging.WARNING)  # open_clip logs model creation at INFO
    startup = [("start the workers", time.time())]  # wall clock: the driver stamped config["started_at"]
    cfg: ExperimentConfig = from_dict(ExperimentConfig, config["experiment"])
    t = Trainee.build(cfg, config["steps_per_epoch"])
    resume = ray.train.get_checkpoint()
    state = t.resume(resume) if resume is not None else None
    if isinstance(state, str):
        return {STOPPED: state, "step": 0}
    t.wrap()
    startup.append(("build the model", time.time()))
    ctx = DistContext.current()
    data = _train_stream(cfg, config["refs"]["train_index"], config["steps_per_epoch"], t.rank, ctx.world_size,
                         t.device)
    fingerprint = plan.fingerprint(data.index, cfg.data)  # saved with each checkpoint's data position
    if state is not None and (stop := _data_changed(state, fingerprint, resume.path, config)):
        return {STOPPED: stop, "step": t.step}
    data.restore(state.get("data_position") if state else None)  # the next unseen sample of the epoch
    tracker, monitor = _open_run(config, t, ctx.world_size, state)
    log, saver = RunLog(tracker, t.rank), Checkpointer(t, data, fingerprint, tracker, ctx)
    startup.append(("open the data and the run", time.time()))
    stopped, metrics = _loop(t, data, ctx, log, saver, startup=(config.get("started_at"), startup))
    if monitor is not None:
        stop_system_metrics(monitor)
    if stopped is not None:
        # an error that a restart would only repeat: end cleanly (Ray Train retries only failed
        # workers), keep the last good checkpoint, mark the MLflow run FAILED with its spool
        # flushed; the driver turns the return value into the error (launch.raise_if_stopped)
        tracker.set_tags({"cliplab.stopped": stopped})
        tracker.finish("FAILED")
        return {STOPPED: stopped, "step": t.step}
    saver.report(metrics, checkpoint=True)  # the final report: a checkpoint (what sweeps register) and the final eval
    if t.rank == 0:
        trial = config.get("trial_name") or cfg.tracking.run_name or cfg.name
        _log_run_artifacts(tracker, metrics, log.history, title=f"{trial} ({cfg.objective.name})")
    tracker.finish()
    return None


def _loop(t: Trainee, data, ctx: DistContext, log: RunLog, saver: Checkpointer,
          startup: tuple[float | None, list] = (None, [])) -> tuple[str | None, dict]:
    """Epochs of steps until the budget is spent; ``(why it stopped early or None, last metrics)``.
    ``startup``: when the driver built the trainer and the worker's start-up marks, for the first-step line."""
    cfg, meter = t.cfg, Throughput(ctx.world_size)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    flops_per_step: float | None = None
    metrics: dict[str, float] = {}
    while t.epoch < cfg.train.epochs and t.step < t.total_steps:
        meter.start_epoch()
        epoch = t.epoch
        for batch in meter.timed(data.batches(t.epoch)):
            if flops_per_step is None:  # count FLOPs once, on the first step
                metrics, flops_per_step = count_flops(t.step_fn(batch, ctx))
                if t.rank == 0:
                    _print_startup(*startup)
            else:
                metrics = t.step_fn(batch, ctx)()
            meter.step_done(len(batch["image"]))
            try:
                skipped = guard.update(metrics, t.step)
            except NonFiniteLossError as err:  # every rank at once: the finite flag is all-reduced
                return str(err), metrics
            if skipped:
                log({"train/nonfinite_skipped": float(guard.total)}, t.step)
                continue
            t.step += 1
            if t.step % cfg.train.log_every == 0:
                metrics.update(meter.metrics(flops_per_step, t.device, cfg.train.peak_tflops))
                metrics["train/nonfinite_skipped"] = float(guard.total)
                metrics.update(data.metrics())  # data/skipped/<reason>, summed over ranks
                log(metrics, t.step)
            if t.step >= t.total_steps:
                break
            if cfg.train.eval_every_steps and t.step % cfg.train.eval_every_steps == 0:
                log(_evaluate(t) if t.rank == 0 else {}, t.step)
            if saver.due():
                saver.report(metrics, checkpoint=True)
        steps_end = time.perf_counter()
        if t.step < t.total_steps:
            t.epoch += 1  # a full pass; a run stopped by max_steps resumes inside the same epoch
        last = t.epoch >= cfg.train.epochs or t.step >= t.total_steps
        log(data.metrics(), t.step)
        if cfg.train.eval_every_epoch or last:
            metrics = {**metrics, **(_evaluate(t) if t.rank == 0 else {})}
            log({k: v for k, v in metrics.items() if k.startswith("val/")}, t.step)
        if not last:
            saver.report(metrics, checkpoint=False)
        _print_progress(t, meter, epoch, steps_end)
    return None, metrics


def _print_startup(started_at: float | None, marks: list[tuple[str, float]]) -> None:
    """Rank 0's line after its first step: how long since the driver built the trainer, and where
    that time went (wall clocks of one host: the driver's and the worker's)."""
    if not started_at:
        return
    now, last, parts = time.time(), started_at, []
    for what, at in [*marks, ("read the first batch and step", now)]:
        parts.append(f"{at - last:.1f} s to {what}")
        last = at
    print(f"first step done {now - started_at:.1f} s after the trial started ({', '.join(parts)})", flush=True)


def _print_progress(t: Trainee, meter: Throughput, epoch: int, steps_end: float) -> None:
    """Rank 0's one line per epoch (``epoch`` counts from 0): steps/s and samples/s (all ranks),
    and the epoch's overhead: waiting for data, plus the eval and report after its last step."""
    if t.rank != 0 or not meter.steps:
        return
    now = time.perf_counter()
    elapsed, stepping = max(now - meter.t0, 1e-9), steps_end - meter.t0 - meter.wait
    print(f"epoch {epoch + 1}/{t.cfg.train.epochs}: step {t.step}/{t.total_steps} | {meter.steps} steps in "
          f"{stepping:.1f} s ({meter.steps / stepping:.2f} steps/s, {meter.samples * meter.world_size / stepping:.0f} "
          f"samples/s) | overhead {elapsed - stepping:.1f} s (data wait {meter.wait:.1f} s, "
          f"eval and report {now - steps_end:.1f} s)", flush=True)


def _data_changed(state: dict, fingerprint: dict, path: str, config: dict) -> str | None:
    """Why a resume on changed shards or ``data.*`` stops (unless ``--allow-data-change``), or None."""
    changed = plan.data_changes(state.get("data_fingerprint") or fingerprint, fingerprint)
    if changed and not config.get("allow_data_change"):
        return data_changed_message(path, state["step"], changed)
    if changed:
        logging.getLogger(__name__).warning("resuming on changed data (%s): the saved data position is "
                                            "applied to the new plan", "; ".join(changed))
    return None


def _open_run(config: dict, t: Trainee, world_size: int, state: dict | None):
    """The run's tracker (a new MLflow run, or the checkpoint's on resume) and its system-metrics
    sampler. A new run gets its params and config.json; a resumed one a ``train/resumed_from_step``."""
    cfg = t.cfg
    tracker = build_tracker(cfg.tracking, rank=t.rank,
                            run_name=config.get("trial_name") or cfg.tracking.run_name or cfg.name,
                            run_id=state.get("mlflow_run_id") if state else None,
                            tags={"objective": cfg.objective.name, "model": cfg.model.name,
                                  "dataset": cfg.data.describe_train(), "sweep": config.get("sweep", ""),
                                  **({"mlflow.parentRunId": config["parent_run_id"]}
                                     if config.get("parent_run_id") else {})})
    if state is None or state.get("mlflow_run_id") is None:
        tracker.log_params({**flatten(to_dict(cfg)), "train.world_size": world_size,
                            "train.precision_resolved": t.precision, **(config.get("provenance") or provenance())})
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_config(to_dict(cfg), Path(tmp)):
                tracker.log_artifact(path)
    if state is not None:  # visible in MLflow: where each restart picked the run up
        tracker.log_metrics({"train/resumed_from_step": float(t.step)}, t.step)
    return tracker, start_system_metrics(cfg, tracker)


def _train_stream(cfg: ExperimentConfig, index_ref, steps_per_epoch: int, rank: int, world: int, device):
    """This rank's :class:`~cliplab.data.stream.RankStream`, from the shard index every worker gets
    (``index_ref``: the driver put it in the object store)."""
    import ray

    from cliplab.data.stream import RankStream
    from cliplab.objectives import data_needs

    index = ray.get(index_ref)
    needs, captions_ref = data_needs(cfg.objective), None
    if needs.caption_embeddings:  # X-CLR: caption embeddings joined by key
        from cliplab.data.captions import load_caption_table

        captions_ref = ray.put(load_caption_table(cfg.data.caption_embeddings, cfg.data.s3))
    return RankStream(index, cfg.data, cfg.model.name, rank=rank, world=world, steps=steps_per_epoch,
                      device=device, views=needs.views, captions_ref=captions_ref, decode_on=_decode_on(cfg, device))


def _log_run_artifacts(tracker, metrics: dict[str, float], history, *, title: str) -> None:
    """The eval report (JSON + Markdown) and the learning curves (PNG) of a finished run."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_eval_report(metrics, Path(tmp), title=title):
            tracker.log_artifact(path, "eval")
        plot = plot_curves(history, Path(tmp) / "learning_curves.png", title=title)
        if plot is not None:
            tracker.log_artifact(plot, "plots")
