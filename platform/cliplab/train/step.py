"""The training step and its optimizer and schedule. No Ray here."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from cliplab.distributed import DistContext


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's groups: no weight decay on gains, biases, embeddings or the objective's scalars."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or name.startswith("objective.")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` of a :class:`~cliplab.models.DualEncoder` (or DDP of one) at
    ``cfg.lr`` times its objective's :attr:`~cliplab.objectives.Objective.lr_scale` (CLOOB's preset
    takes 0.1); ``cfg.fused`` None picks the fused kernel when the parameters live on CUDA (move
    the module to its device first)."""
    on_cuda = all(p.is_cuda for p in module.parameters())
    fused = cfg.fused if cfg.fused is not None else on_cuda
    lr = cfg.lr * unwrap(module).objective.lr_scale
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def configure_device(device: torch.device, *, tf32: bool) -> None:
    """Per-process CUDA settings: TF32 for the fp32 matmuls and convolutions (the losses after
    the projection run in fp32), and cuDNN autotuning. Nothing to do on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warmup to the base lr over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` for ``device``: ``auto`` is bf16 on CUDA GPUs that have it, fp16 on
    those that do not (V100, T4), fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs a gradient scaler (open_clip_train's ``--precision amp``); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def autocast(precision: str, device: torch.device):
    """bf16 or fp16 autocast, or nothing (fp32, the CPU default)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _extras(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"caption_embeddings": batch["caption_embedding"]} if "caption_embedding" in batch else {}


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], rows: slice) -> tuple:
    return model(batch["image"][rows], batch["text"][rows],
                 batch["image_2"][rows] if "image_2" in batch else None)


def _loss(objective, features: tuple, ctx: DistContext, extras: dict):
    image, text, *view_2 = features
    return objective.loss(image, text, ctx, {**extras, **({"image_features_2": view_2[0]} if view_2 else {})})


def compute_gradients(model: nn.Module, batch: dict[str, torch.Tensor], ctx: DistContext, *,
                      accum_steps: int = 1, precision: str = "fp32", scaler=None):
    """Forward and backward of one optimizer step; gradients accumulate into ``.grad``.

    With ``accum_steps = k`` the batch is split into k micro-batches and the global negatives
    are kept, as open_clip's ``accum_freq`` does: features of every micro-batch are computed
    without gradient and cached, then each micro-batch is recomputed with gradient and the loss
    is taken over the whole batch (its own rows live, the others from the cache). The sum of
    the k backward passes is the full-batch gradient of the encoders; the objective's scalars
    see the full loss k times, so their gradient is divided by k. Activation memory is that of
    one micro-batch. DDP synchronises only on the last backward. With an fp16 ``scaler`` the
    gradients are those of the scaled loss (unscale them before reading them).
    """
    objective = unwrap(model).objective
    device = batch["image"].device
    extras = _extras(batch)
    n = len(batch["image"])
    if accum_steps == 1:
        with autocast(precision, device):
            out = _loss(objective, _forward(model, batch, slice(None)), ctx, extras)
        _backward(out.loss, scaler)
        return out
    if n % accum_steps:
        raise ValueError(f"batch of {n} does not split into {accum_steps} equal micro-batches")
    m = n // accum_steps
    parts = [slice(j * m, (j + 1) * m) for j in range(accum_steps)]
    with torch.no_grad(), autocast(precision, device):
        cached = [_forward(model, batch, rows) for rows in parts]
    for j, rows in enumerate(parts):
        last = j == accum_steps - 1
        with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast(precision, device):
                live = _forward(model, batch, rows)
                features = tuple(
                    None if live[i] is None else torch.cat([live[i] if jj == j else cached[jj][i]
                                                            for jj in range(accum_steps)])
                    for i in range(len(live)))
                out = _loss(objective, features, ctx, extras)
            _backward(out.loss, scaler)
    for p in objective.parameters():
        if p.grad is not None:
            p.grad /= accum_steps
    return out


def _host_values(named: dict[str, torch.Tensor], guarded: tuple[str, ...],
                 ctx: DistContext) -> tuple[bool, dict[str, float]]:
    """The step's one device → host copy: every metric of ``named``, and whether the ``guarded``
    ones are finite on every rank (so all ranks skip a step together)."""
    def scalars(tensors):
        return torch.stack([v.detach().float().reshape(()) for v in tensors])

    values = scalars(named.values())
    finite = torch.isfinite(scalars(named[k] for k in guarded)).all().float().reshape(1)  # no host copy
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    *host, ok = torch.cat([values, finite]).tolist()
    return ok == 1.0, dict(zip(named, host, strict=True))


def _on_every_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """``flag`` and-ed over the ranks (a collective on a skipped fp16 step only)."""
    t = torch.tensor([float(flag)], device=device)
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer, scheduler,
               ctx: DistContext, *, accum_steps: int = 1, grad_clip_norm: float | None = None,
               precision: str = "fp32", scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimizer step on a batch of ``image`` and ``text`` tensors (plus ``image_2`` and
    ``caption_embedding`` for X-CLR). Returns metrics; ``train/nonfinite`` is 1.0 when the loss
    or the gradient norm was not finite on some rank, in which case nothing was updated. With an
    fp16 ``scaler`` (:func:`grad_scaler`), gradients that overflow under a finite loss also mark
    ``train/fp16_overflow``: the scaler lowers its scale for the next batch, as open_clip_train's does.

    The host waits for the GPU once, before the update, so that the optimizer's kernels overlap
    the next step's launch; the objective's scalars are reported as this step's loss used them.
    """
    objective = unwrap(model).objective
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = compute_gradients(model, batch, ctx, accum_steps=accum_steps, precision=precision, scaler=scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for the norm and the clip
    if grad_clip_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    else:  # measured only: no pass that multiplies every gradient by 1
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    named = {"train/loss": out.loss, "train/grad_norm": grad_norm,
             **{f"train/{k}": v for k, v in out.terms.items()}, **objective.metric_tensors()}
    finite, metrics = _host_values(named, ("train/loss", "train/grad_norm"), ctx)
    lr = scheduler.get_last_lr()[0]
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        bad = {f"nonfinite/{k}": v for k, v in metrics.items() if not math.isfinite(v)}  # what went wrong here
        if scaler is None:
            return {"train/nonfinite": 1.0, "train/lr": lr, **bad}
        scaler.update()  # non-finite gradients lower the scale
        overflow = _on_every_rank(math.isfinite(metrics["train/loss"]), ctx, out.loss.device)
        return {"train/nonfinite": 1.0, "train/fp16_overflow": float(overflow), "train/lr": lr, **bad}
    if scaler is not None:
        scaler.step(optimizer)  # already unscaled, and finite: it steps
        scaler.update()  # and grows the scale after enough good steps
    else:
        optimizer.step()
    scheduler.step()
    objective.clamp_()
    return {**metrics, "train/lr": scheduler.get_last_lr()[0], "train/nonfinite": 0.0}


class NonFiniteGuard:
    """Counts skipped non-finite steps; ``limit`` in a row is an error (the run stops, keeping
    its last good checkpoint)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_row, self.total = limit, 0, 0
        self.bad: dict[str, float] = {}  # the metrics that were not finite in the streak, by name

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """True when the step was skipped. Raises :class:`NonFiniteLossError` at the limit, naming
        the step and the metrics that were not finite (on this rank). An fp16 overflow (a finite
        loss whose scaled gradients overflowed; the scaler has lowered its scale) is skipped
        without counting towards the limit, unless :data:`MAX_FP16_OVERFLOWS` come in a row."""
        if metrics.get("train/nonfinite", 0.0) == 0.0:
            self.in_row, self.bad, self.overflows_in_row = 0, {}, 0
            return False
        if metrics.get("train/fp16_overflow", 0.0) == 1.0:
            self.overflows_in_row = getattr(self, "overflows_in_row", 0) + 1
            if self.overflows_in_row >= MAX_FP16_OVERFLOWS:
                raise NonFiniteLossError(
                    f"fp16 gradients overflowed {self.overflows_in_row} times in a row after step {step} (the "
                    "scale fell each time); the last good checkpoint is kept. Use train.precision=bf16 or fp32.")
            return True
        self.in_row += 1
        self.total += 1
        self.bad.update({k[len("nonfinite/"):]: v for k, v in metrics.items() if k.startswith("nonfinite/")})
        if self.in_row >= self.limit:
            which = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items())) or "on another rank"
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row after step {step} ({self.total} skipped in all; "
                f"not finite: {which}); the last good checkpoint is kept. Lower optim.lr, set "
                "optim.grad_clip_norm, or check the data.")
        return True


MAX_FP16_OVERFLOWS = 40  # the gradient scale halves each time: 2^16 → 2^-24


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointTimer:
    """When to checkpoint: every ``every_steps`` steps, and (with ``every_minutes``) when that much
    time has passed since the last one. The clocks of the ranks disagree, so rank 0 decides the
    time-based checkpoints and broadcasts its decision (a collective on every rank, each step,
    only when ``every_minutes`` is set): checkpointing is a collective too, and ranks that
    decided differently would wait for each other forever."""

    def __init__(self, every_steps: int, every_minutes: float | None, ctx: DistContext, clock=None) -> None:
        import time

        self.every_steps, self.every_minutes, self.ctx = every_steps, every_minutes, ctx
        self.clock = clock or time.monotonic
        self.last = self.clock()

    def due(self, step: int) -> bool:
        if step % self.every_steps == 0:
            return True  # the same step on every rank: no collective needed
        if self.every_minutes is None:
            return False
        return self.ctx.broadcast_flag(self.clock() - self.last >= 60 * self.every_minutes)

    def done(self) -> None:
        self.last = self.clock()
