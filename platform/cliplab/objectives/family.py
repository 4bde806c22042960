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
from torch.utils.checkpoint import checkpoint

from cliplab.distributed import DistContext
from cliplab.objectives import lorentz as L
from cliplab.objectives.base import LossOutput, Objective, at_least_fp32
from cliplab.objectives.hopfield import sphere_retrieval

MASK = -1e9  # finite: soft targets × masked logits must never meet -inf
SIGMOID_BIAS_INIT = -10.0  # SigLIP's b at init, unless the config or model.pretrained gives one

PRESETS: dict[str, dict] = {
    "clip": dict(geometry="euclidean", targets="hard", denominator="infonce", retrieval="none",
                 entailment_weight=0.0, temperature=0.07, learn_temperature=True, lr_scale=1.0),
    "siglip": dict(geometry="euclidean", targets="hard", denominator="sigmoid", retrieval="none",
                   entailment_weight=0.0, temperature=0.1, learn_temperature=True, lr_scale=1.0),
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


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a_i · b_i`` (B) in fp32, rounded the way an autocast matmul of fp32 inputs rounds
    (bf16 operands, fp32 sums, a bf16 result), so that a positive logit computed row by row
    equals its entry in the logits matrix."""
    device = a.device.type
    if a.dtype == b.dtype == torch.float32 and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        return (a.to(low).float() * b.to(low).float()).sum(-1).to(low).float()
    return (a * b).sum(-1)


class ContrastiveObjective(Objective):
    """The whole family in one module; ``cfg`` is an :class:`cliplab.config.ObjectiveConfig`."""

    def __init__(self, cfg, embed_dim: int = 512) -> None:
        super().__init__()
        self.cfg = cfg
        self.r = resolve(cfg)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / self.r.temperature)),
                                      requires_grad=self.r.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)
        if self.r.denominator == "sigmoid":
            bias = cfg.sigmoid_bias_init if cfg.sigmoid_bias_init is not None else SIGMOID_BIAS_INIT
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        if self.r.retrieval == "hopfield":
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.hopfield_beta)), requires_grad=cfg.learn_beta)
        if self.r.geometry == "lorentz":
            alpha = cfg.alpha_init if cfg.alpha_init is not None else embed_dim ** -0.5
            self.log_alpha_image = nn.Parameter(torch.tensor(math.log(alpha)))
            self.log_alpha_text = nn.Parameter(torch.tensor(math.log(alpha)))
            self.log_curvature = nn.Parameter(torch.tensor(math.log(cfg.curvature_init)),
                                              requires_grad=cfg.learn_curvature)

    @property
    def lr_scale(self) -> float:
        """The preset's lr multiplier. CLOOB's is 0.1: at init the towers' embeddings are bunched
        (mean cosine ≈ 0.98 for cliplab-tiny), so every Hopfield retrieval returns nearly the
        batch mean and the loss is nearly flat; Adam takes lr-sized steps whatever the gradient's
        size, and at InfoNCE's step sizes those steps raise the loss into the collapsed plateau
        (every retrieved vector equal, loss 2·ln(N−1), gradient → 0), where it stays. The
        reference avoids it by a 20,000-step warmup."""
        return self.r.lr_scale

    @property
    def needs_text(self) -> bool:
        return not self._view_to_view

    @property
    def _view_to_view(self) -> bool:
        """X-CLR's seed setting: soft targets between two augmented image views."""
        return self.r.targets == "soft" and self.cfg.soft_target_views == "image_image"

    # geometry ----------------------------------------------------------------------------
    @property
    def curvature(self) -> torch.Tensor:
        return self.log_curvature.exp()

    def embed(self, features: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """Map raw projected features into the geometry (fp32): the unit sphere, or the
        hyperboloid via ``exp_map0(α · f)`` (space components only)."""
        f = at_least_fp32(features)
        if self.r.geometry == "euclidean":
            return F.normalize(f, dim=-1)
        alpha = (self.log_alpha_image if modality == "image" else self.log_alpha_text).exp()
        return L.exp_map0(alpha * f, self.curvature)

    def ensemble(self, text_features: torch.Tensor) -> torch.Tensor:
        """Prompt ensembling in the objective's own space: normalise-mean-normalise on the
        sphere; the tangent-space mean before the lift on the hyperboloid."""
        f = at_least_fp32(text_features)
        if self.r.geometry == "euclidean":
            return F.normalize(F.normalize(f, dim=-1).mean(dim=0), dim=-1)
        return L.exp_map0(self.log_alpha_text.exp() * f.mean(dim=0), self.curvature)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine on the sphere; negative geodesic distance on the hyperboloid."""
        if self.r.geometry == "euclidean":
            return a @ b.T
        return -L.distance(a, b, self.curvature)

    def hopfield(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One modern-Hopfield update: ``softmax(β · sim(q, M)) M``, back into the geometry
        (normalised on the sphere; averaged in the origin's tangent space, then lifted, on the
        hyperboloid).

        With ``hopfield_chunk`` set and gradients on, the queries run in chunks whose B × N
        weights are recomputed in backward instead of kept, so the retrieval holds no B × N
        matrix between forward and backward: on the sphere by
        :func:`hopfield.sphere_retrieval`'s FlashAttention-style backward (which recomputes only
        the scores), on the hyperboloid by activation checkpointing."""
        beta = self.log_beta.exp()
        chunk = self.cfg.hopfield_chunk
        if chunk is None or not torch.is_grad_enabled():
            return self._retrieve(queries, memory, beta)
        if self.r.geometry == "euclidean":
            return F.normalize(sphere_retrieval(queries, memory, beta, chunk), dim=-1)
        return torch.cat([checkpoint(self._retrieve, q, memory, beta, use_reentrant=False)
                          for q in queries.split(chunk)])

    def _retrieve(self, queries: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if self.r.geometry == "euclidean":  # β scales the B queries, not the B × N scores
            weights = torch.softmax(at_least_fp32((beta * queries) @ memory.T), dim=1)
            return F.normalize(weights @ memory, dim=-1)
        c = self.curvature
        weights = torch.softmax(L.scaled_neg_distance(queries, memory, c, beta), dim=1)
        return L.exp_map0(L.tangent_mean(weights, memory, c), c)

    def _logits(self, anchors: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """``s · sim(anchors, columns)`` (B × N) in fp32, without keeping a second B × N matrix
        for the gradient of ``s``: on the sphere ``s`` scales the B anchors; on the hyperboloid
        :func:`lorentz.scaled_neg_distance` keeps only the points."""
        scale = self.log_scale.exp()
        if self.r.geometry == "euclidean":
            return at_least_fp32((scale * anchors) @ columns.T)
        return L.scaled_neg_distance(anchors, columns, self.curvature, scale)

    def _positive_logits(self, anchors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        """``s · sim(anchor_i, partner_i)`` row by row (B): the diagonal, without a B × N mask."""
        scale = self.log_scale.exp()
        if self.r.geometry == "euclidean":
            return _rowwise_dot(scale * at_least_fp32(anchors), at_least_fp32(partners))
        return -scale * L.paired_distance(anchors, partners, self.curvature)

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
        if self.r.entailment_weight > 0:
            if self.r.geometry != "lorentz":
                raise ValueError("entailment cones need the lorentz geometry")
            terms["loss/entailment"] = self.entailment(x, y)
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

    def entailment(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MERU's cone loss on local pairs: text ``y_i`` entails image ``x_i``."""
        c = self.curvature
        angle = L.oxy_angle(y, x, c)
        aperture = L.half_aperture(y, c, self.cfg.aperture_k)
        return torch.relu(angle - aperture).mean()

    # scalars -----------------------------------------------------------------------------
    def metric_tensors(self) -> dict[str, torch.Tensor]:
        out = {"scalars/logit_scale": self.log_scale.detach().exp()}
        if hasattr(self, "bias"):
            out["scalars/sigmoid_bias"] = self.bias.detach()
        if hasattr(self, "log_beta"):
            out["scalars/hopfield_beta"] = self.log_beta.detach().exp()
        if hasattr(self, "log_curvature"):
            out["scalars/curvature"] = self.curvature.detach()
            out["scalars/alpha_image"] = self.log_alpha_image.detach().exp()
            out["scalars/alpha_text"] = self.log_alpha_text.detach().exp()
        return out

    @torch.no_grad()
    def clamp_(self) -> None:
        """The spec's clamps: s ∈ [1, max_logit_scale]; c ∈ [c_min, c_max]; α ≤ 1."""
        self.log_scale.clamp_(0.0, self.max_log_scale)
        if hasattr(self, "log_curvature"):
            self.log_curvature.clamp_(math.log(self.cfg.curvature_min), math.log(self.cfg.curvature_max))
            self.log_alpha_image.clamp_(max=0.0)
            self.log_alpha_text.clamp_(max=0.0)
