"""CLIP's symmetric InfoNCE, local rows × global columns."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.distributed import DistContext
from cliplab.objectives.base import LossOutput, Objective


class ClipObjective(Objective):
    """``L = (CE(s·x Yᵀ, labels) + CE(s·y Xᵀ, labels)) / 2`` on the unit sphere.

    ``s = 1/τ`` is stored as ``log s``, initialised to ``log(1/temperature)`` and clamped to
    ``[0, log max_logit_scale]`` after every optimizer step. Labels are ``arange(B) + B·rank``.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        init = torch.tensor(math.log(1.0 / cfg.temperature))
        self.log_scale = nn.Parameter(init, requires_grad=cfg.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T

    def loss(self, image_features, text_features, ctx: DistContext, extras=None) -> LossOutput:
        x = self.embed(image_features)
        y = self.embed(text_features)
        x_all, y_all = ctx.gather(x), ctx.gather(y)
        scale = self.log_scale.exp()
        labels = torch.arange(x.shape[0], device=x.device) + x.shape[0] * ctx.rank
        loss_i = F.cross_entropy(scale * x @ y_all.T, labels)
        loss_t = F.cross_entropy(scale * y @ x_all.T, labels)
        loss = (loss_i + loss_t) / 2
        return LossOutput(loss, {"loss/image_to_text": loss_i, "loss/text_to_image": loss_t})

    def metrics(self) -> dict[str, float]:
        return {"scalars/logit_scale": float(self.log_scale.detach().exp())}

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log_scale)
