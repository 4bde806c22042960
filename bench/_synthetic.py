"""The set-up the step benchmarks share: one preset's DualEncoder, optimizer, schedule and a
synthetic batch on one device, and a closure that runs cliplab's real ``train_step`` on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cliplab.config import ModelConfig, ObjectiveConfig, OptimConfig
from cliplab.distributed import DistContext
from cliplab.models import DualEncoder, build_model, freeze_text_tower
from cliplab.objectives import build_objective
from cliplab.train.step import build_optimizer, configure_device, cosine_with_warmup, train_step

CAPTION_DIM = 384  # all-MiniLM-L6-v2, X-CLR's frozen sentence encoder


@dataclass
class SyntheticStep:
    run: Callable[[], dict[str, float]]  # one optimizer step, as the trainer takes it
    sync: Callable[[], None]  # waits for the device (a no-op on CPU)


def synthetic_step(model: str, preset: str, batch_size: int, device: str, precision: str,
                   compile_mode: str | None | bool = False) -> SyntheticStep:
    """What the trainer's worker builds (TF32 and cuDNN settings, the model moved before the
    optimizer, a frozen text tower where the objective needs none), fed random images and tokens.
    ``compile_mode=False`` runs eager; ``None`` or a mode name runs the encoders under ``torch.compile``."""
    torch.manual_seed(0)
    configure_device(torch.device(device), tf32=True)  # train.tf32's default, as open_clip_train sets it
    bundle = build_model(ModelConfig(name=model))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig(name=preset), bundle.embed_dim))
    if not module.objective.needs_text:
        freeze_text_tower(module.model)
    module = module.to(device)
    if compile_mode is not False:
        module.compile_encoders(mode=compile_mode)
    opt = build_optimizer(module, OptimConfig())
    sched = cosine_with_warmup(opt, 10, 10_000)
    size = bundle.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    batch = {"image": torch.randn(batch_size, 3, size, size, device=device),
             "text": torch.randint(0, 49408, (batch_size, bundle.context_length), device=device)}
    if preset == "xclr":  # its second augmented view and the caption embeddings
        batch["image_2"] = torch.randn_like(batch["image"])
        batch["caption_embedding"] = torch.randn(batch_size, CAPTION_DIM, device=device)
    cuda = device.startswith("cuda")
    return SyntheticStep(
        run=lambda: train_step(module, batch, opt, sched, DistContext(), precision=precision),
        sync=torch.cuda.synchronize if cuda else (lambda: None))
