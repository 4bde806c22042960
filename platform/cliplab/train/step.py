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
    """AdamW over :func:`param_groups`; ``cfg.fused`` None picks the fused kernel when the
    parameters live on CUDA (move the module to its device first)."""
    on_cuda = all(p.is_cuda for p in module.parameters())
    fused = cfg.fused if cfg.fused is not None else on_cuda
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr,
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


def autocast(precision: str, device: torch.device):
    """bf16 autocast (GPU runs) or nothing (fp32, the CPU default)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _extras(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"caption_embeddings": batch["caption_embedding"]} if "caption_embedding" in batch else {}


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], rows: slice) -> tuple:
    return model(batch["image"][rows], batch["text"][rows],
                 batch["image_2"][rows] if "image_2" in batch else None)


def _loss(objective, features: tuple, ctx: DistContext, extras: dict):
    image, text, *view_2 = features
    return objective.loss(image, text, ctx, {**extras, **({"image_features_2": view_2[0]} if view_2 else {})})


def compute_gradients(model: nn.Module, batch: dict[str, torch.Tensor], ctx: DistContext, *,
                      accum_steps: int = 1, precision: str = "fp32"):
    """Forward and backward of one optimizer step; gradients accumulate into ``.grad``.

    With ``accum_steps = k`` the batch is split into k micro-batches and the global negatives
    are kept, as open_clip's ``accum_freq`` does: features of every micro-batch are computed
    without gradient and cached, then each micro-batch is recomputed with gradient and the loss
    is taken over the whole batch (its own rows live, the others from the cache). The sum of
    the k backward passes is the full-batch gradient of the encoders; the objective's scalars
    see the full loss k times, so their gradient is divided by k. Activation memory is that of
    one micro-batch. DDP synchronises only on the last backward.
    """
    objective = unwrap(model).objective
    device = batch["image"].device
    extras = _extras(batch)
    n = len(batch["image"])
    if accum_steps == 1:
        with autocast(precision, device):
            out = _loss(objective, _forward(model, batch, slice(None)), ctx, extras)
        out.loss.backward()
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
            out.loss.backward()
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


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer, scheduler,
               ctx: DistContext, *, accum_steps: int = 1, grad_clip_norm: float | None = None,
               precision: str = "fp32") -> dict[str, float]:
    """One optimizer step on a batch of ``image`` and ``text`` tensors (plus ``image_2`` and
    ``caption_embedding`` for X-CLR). Returns metrics; ``train/nonfinite`` is 1.0 when the loss
    or the gradient norm was not finite on some rank, in which case nothing was updated.

    The host waits for the GPU once, before the update, so that the optimizer's kernels overlap
    the next step's launch; the objective's scalars are reported as this step's loss used them.
    """
    objective = unwrap(model).objective
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = compute_gradients(model, batch, ctx, accum_steps=accum_steps, precision=precision)
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
        return {"train/nonfinite": 1.0, "train/lr": lr}
    optimizer.step()
    scheduler.step()
    objective.clamp_()
    return {**metrics, "train/lr": scheduler.get_last_lr()[0], "train/nonfinite": 0.0}


class NonFiniteGuard:
    """Counts skipped non-finite steps; ``limit`` in a row is an error (the run stops, keeping
    its last good checkpoint)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_row, self.total = limit, 0, 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """True when the step was skipped. Raises :class:`NonFiniteLossError` at the limit."""
        if metrics.get("train/nonfinite", 0.0) == 0.0:
            self.in_row = 0
            return False
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row after step {step} ({self.total} skipped in all); "
                "the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip_norm, or check the data.")
        return True


class NonFiniteLossError(RuntimeError):
    pass
