"""One contrastive family: geometry × targets × denominator × retrieval × entailment.

The five presets (``clip``, ``siglip``, ``cloob``, ``meru``, ``xclr``) are points of this family
(see ``shared/objectives.md``); any other combination is legal, e.g. Hopfield retrieval in
Lorentz geometry or soft targets with InfoLOOB.

Distributed exactness: every rank computes its *local rows* against the *global columns*,
gathered with gradient, so that after DDP averages gradients the result is the gradient of the
global-batch loss. Hopfield retrieval runs for the local queries only against the gathered
memories (B × N), and the retrieved embeddings are gathered with gradient for the columns.
Logsumexps and everything after the projection run in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliplab.distributed import DistContext
from cliplab.objectives.base import DataNeeds, LossOutput, Objective
from cliplab.objectives.geometry import GEOMETRIES
from cliplab.objectives.numerics import at_least_fp32

MASK = -1e9  # finite: soft targets × masked logits must never meet -inf
SIGMOID_BIAS_INIT = -10.0  # SigLIP's b at init, unless the config or model.pretrained gives one

PRESETS: dict[str, dict] = {
    "clip": dict(geometry="euclidean", targets="hard", denominator="infonce", retrieval="none",
                 entailment_weight=0.0, temperature=0.07, learn_temperature=True, lr_scale=1.0),
    "siglip": dict(geometry="euclidean", targets="hard", denominator="sigmoid", retrieval="none",
                   entailment_weight=0.0, temperature=0.1, learn_temperature=True, lr_scale=0.1),
    "cloob": dict(geometry="euclidean", targets="hard", denominator="infoloob", retrieval="hopfield",
                  entailment_weight=0.0, temperature=1 / 30, learn_temperature=False, lr_scale=0.1),
    "meru": dict(geometry="lorentz", targets="hard", denominator="infonce", retrieval="none",
                 entailment_weight=0.2, temperature=0.07, learn_temperature=True, lr_scale=1.0),
    "xclr": dict(geometry="euclidean", targets="soft", denominator="infonce", retrieval="none",
                 entailment_weight=0.0, temperature=0.1, learn_temperature=False, lr_scale=1.0),
}
CHOICES = {"geometry": ("euclidean", "lorentz"), "targets": ("hard", "soft"),
           "denominator": ("infonce", "infoloob", "sigmoid"), "retrieval": ("none", "hopfield")}


@dataclass(frozen=True)
class Resolved:
    """An :class:`ObjectiveConfig` with the preset's defaults filled in."""

    geometry: str
    targets: str
    denominator: str
    retrieval: str
    entailment_weight: float
    temperature: float
    learn_temperature: bool
    lr_scale: float


def resolve(cfg) -> Resolved:
    """Fill every ``None`` field of the config from its preset (``cfg.name``)."""
    base = PRESETS.get(cfg.name, PRESETS["clip"])
    return Resolved(**{k: (getattr(cfg, k) if getattr(cfg, k) is not None else v) for k, v in base.items()})


def data_needs(cfg) -> DataNeeds:
    """What the objective ``cfg`` describes needs from the data, read off the config alone (the
    worker and ``config.validate`` ask before any objective is built)."""
    soft = resolve(cfg).targets == "soft"  # X-CLR: caption embeddings, and two views between images
    return DataNeeds(views=2 if soft and cfg.soft_target_views == "image_image" else 1, caption_embeddings=soft)


class ContrastiveObjective(Objective):
    """The whole family in one module; ``cfg`` is an :class:`cliplab.config.ObjectiveConfig`.
    Its :attr:`geometry` (a :class:`~cliplab.objectives.geometry.Sphere` or
    :class:`~cliplab.objectives.geometry.Hyperboloid`) embeds and scores; the module owns the
    temperature, SigLIP's bias and Hopfield's β, and registers the geometry's scalars."""

    def __init__(self, cfg, embed_dim: int = 512) -> None:
        super().__init__()
        self.cfg = cfg
        self.r = resolve(cfg)
        self.data_needs = data_needs(cfg)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / self.r.temperature)),
                                      requires_grad=self.r.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)
        if self.r.denominator == "sigmoid":
            bias = cfg.sigmoid_bias_init if cfg.sigmoid_bias_init is not None else SIGMOID_BIAS_INIT
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        if self.r.retrieval == "hopfield":
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.hopfield_beta)), requires_grad=cfg.learn_beta)
        self.geometry = GEOMETRIES[self.r.geometry](cfg, embed_dim)
        for name, p in self.geometry.scalars().items():  # flat names: log_curvature, not geometry.…
            self.register_parameter(name, p)

    @property
    def lr_scale(self) -> float:
        """The preset's lr multiplier: 0.1 for SigLIP and CLOOB, 1 for the InfoNCE presets.

        Both losses have a collapsed plateau (every embedding, or every Hopfield-retrieved
        embedding, the same vector) whose loss is at or below their loss at init: SigLIP's is
        ``(N−1)·softplus(−ln(N−1)) + softplus(ln(N−1))`` (5.15 at N = 64, against 9.95 at init with
        b = −10), CLOOB's ``2·ln(N−1)`` (8.29, against 8.3–9.9 at init, since untrained towers'
        embeddings are bunched: mean cosine 0.986 for cliplab-tiny, so retrieval returns nearly the
        batch mean). InfoNCE has no such pull: every row's loss is unchanged when all embeddings
        move together. Adam's lr-sized steps, whatever the gradient's size, reach that plateau in a
        few steps at InfoNCE's step sizes, and there the gradient is ~0 and stays so. Measured on
        ``tests/test_presets_learn.py``'s fixed set: at lr 2e-3 both collapse (SigLIP at every bias
        init tried, −10 to −4, and at τ 0.05–0.1; CLOOB at β 8, 14.3 and 30), at 5e-4 SigLIP still
        collapses for one seed of two, at 2e-4 both learn. The CLOOB reference warms up over
        20,000 steps instead; SigLIP's paper trains at batch 4k–32k for 100k+ steps."""
        return self.r.lr_scale

    @property
    def needs_text(self) -> bool:
        return not self._view_to_view

    @property
    def _view_to_view(self) -> bool:
        """X-CLR's seed setting: soft targets between two augmented image views."""
        return self.data_needs.views == 2

    # geometry ----------------------------------------------------------------------------
    @property
    def curvature(self) -> torch.Tensor:
        """The hyperboloid's ``c`` (Lorentz geometry only)."""
        return self.geometry.curvature

    def hopfield(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One modern-Hopfield update at the learned β (:meth:`Geometry.retrieve`), in chunks
        recomputed in backward when ``hopfield_chunk`` is set."""
        return self.geometry.retrieve(queries, memory, self.log_beta.exp(), self.cfg.hopfield_chunk)

    def _logits(self, anchors: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``s · sim(anchors, columns)`` (B × N) in fp32."""
        return self.geometry.logits(anchors, columns, self.log_scale.exp())

    def _positive_logits(self, anchors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        """``s · sim(anchor_i, partner_i)`` row by row (B): the diagonal, without a B × N mask."""
        return self.geometry.positive_logits(anchors, partners, self.log_scale.exp())

    # loss --------------------------------------------------------------------------------
    def loss(self, image_features, text_features, ctx: DistContext, extras=None) -> LossOutput:
        extras = extras or {}
        x = self.embed(image_features, "image")
        if self._view_to_view:
            if "image_features_2" not in extras:
                raise ValueError("soft targets between image views need extras['image_features_2']")
            y = self.embed(extras["image_features_2"], "image")
        else:
            y = self.embed(text_features, "text")
        x_all, y_all = ctx.gather(x), ctx.gather(y)
        targets = None
        if self.r.targets == "soft":
            if "caption_embeddings" not in extras:
                raise ValueError("soft targets need extras['caption_embeddings'] (cliplab data embed-captions)")
            e = F.normalize(at_least_fp32(extras["caption_embeddings"]), dim=-1)
            e_all = ctx.gather_no_grad(e)
            targets = torch.softmax(e @ e_all.T / self.cfg.soft_target_temperature, dim=1)

        terms: dict[str, torch.Tensor] = {}
        if self.r.retrieval == "hopfield":
            u_x, u_y = self.hopfield(x, x_all), self.hopfield(y, x_all)
            v_x, v_y = self.hopfield(x, y_all), self.hopfield(y, y_all)
            terms["loss/image_retrieval"] = self._pair(u_x, ctx.gather(u_y), ctx, targets)
            terms["loss/text_retrieval"] = self._pair(v_y, ctx.gather(v_x), ctx, targets)
            contrastive = terms["loss/image_retrieval"] + terms["loss/text_retrieval"]
        elif self.r.denominator == "sigmoid" or self._view_to_view:
            # SigLIP's sum over all pairs and X-CLR's view z → view z' are one-directional
            contrastive = self._pair(x, y_all, ctx, targets)
        else:
            terms["loss/image_to_text"] = self._pair(x, y_all, ctx, targets)
            terms["loss/text_to_image"] = self._pair(y, x_all, ctx, targets)
            combine = (lambda a, b: a + b) if self.r.denominator == "infoloob" else (lambda a, b: (a + b) / 2)
            contrastive = combine(terms["loss/image_to_text"], terms["loss/text_to_image"])
        if self.r.denominator == "infoloob" and self.cfg.loob_scale_by_tau:
            contrastive = contrastive / self.log_scale.exp()
        loss = contrastive
        if self.r.entailment_weight > 0:  # MERU: text y_i entails image x_i (a ValueError on the sphere)
            terms["loss/entailment"] = self.geometry.entailment_loss(x, y)
            terms["loss/contrastive"] = contrastive
            loss = contrastive + self.r.entailment_weight * terms["loss/entailment"]
        return LossOutput(loss, terms)

    def _pair(self, anchors, columns, ctx: DistContext, targets) -> torch.Tensor:
        """One direction: local anchor rows against global columns, by the denominator. Row
        ``i``'s positive is column ``i + B · rank``."""
        b = anchors.shape[0]
        offset = b * ctx.rank
        logits = self._logits(anchors, columns)
        hard = targets is None or self.r.denominator == "sigmoid"  # SigLIP's pair labels are hard
        positive = self._positive_logits(anchors, columns[offset:offset + b]) if hard else None
        if self.r.denominator == "sigmoid":
            # −log σ(z) for the positive, −log σ(−z) = softplus(z) for the rest: Σ_j softplus(z_ij) − z_ii
            return (F.softplus(logits + self.bias).sum(dim=1) - (positive + self.bias)).mean()
        target_term = positive if targets is None else (targets * logits).sum(dim=1)
        if self.r.denominator == "infoloob":  # leave the positive out of the denominator (finite mask)
            logits = logits.clone()
            logits.diagonal(offset).fill_(MASK)
        return (torch.logsumexp(logits, dim=1) - target_term).mean()

    # scalars -----------------------------------------------------------------------------
    def metric_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scalars/logit_scale": self.log_scale.detach().exp()}
        if hasattr(self, "bias"):
            out["scalars/sigmoid_bias"] = self.bias.detach()
        if hasattr(self, "log_beta"):
            out["scalars/hopfield_beta"] = self.log_beta.detach().exp()
        return out | self.geometry.metric_tensors()

    @torch.no_grad()
    def clamp_(self) -> None:
        """The spec's clamps: s ∈ [1, max_logit_scale], then the geometry's (c ∈ [c_min, c_max]; α ≤ 1)."""
        self.log_scale.clamp_(0.0, self.max_log_scale)
        self.geometry.clamp_()
