"""The training step and its optimizer and schedule. No Ray here."""

from __future__ import annotations

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
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warmup to the base lr over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer, scheduler,
               ctx: DistContext) -> dict[str, float]:
    """One optimizer step on a batch of ``image`` and ``text`` tensors (plus ``image_2`` and
    ``caption_embedding`` for X-CLR). Returns metrics."""
    objective = unwrap(model).objective
    model.train()
    image_features, text_features, *view_2 = model(batch["image"], batch["text"], batch.get("image_2"))
    extras = {"image_features_2": view_2[0]} if view_2 else {}
    if "caption_embedding" in batch:
        extras["caption_embeddings"] = batch["caption_embedding"]
    out = objective.loss(image_features, text_features, ctx, extras)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    optimizer.step()
    scheduler.step()
    objective.clamp_()
    metrics = {"train/loss": float(out.loss.detach()), "train/grad_norm": float(grad_norm),
               "train/lr": scheduler.get_last_lr()[0]}
    metrics.update({f"train/{k}": float(v.detach()) for k, v in out.terms.items()})
    metrics.update(objective.metrics())
    return metrics
