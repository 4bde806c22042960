"""The family's two geometries: the unit sphere and the hyperboloid (Lorentz model).

A geometry owns its learnable scalars (none on the sphere; MERU's α per modality and the
curvature ``c`` on the hyperboloid) and everything the objective does with points: the map
from raw features (:meth:`~Geometry.embed`, :meth:`~Geometry.ensemble`), the score
(:meth:`~Geometry.similarity`, the scaled :meth:`~Geometry.logits`), Hopfield retrieval, and, on
the hyperboloid only (``cones``), the entailment cones. The Lorentz maths, the distance to the
origin among them, are pure functions in :mod:`cliplab.objectives.lorentz`.

A geometry is not an ``nn.Module``: the objective registers the same ``nn.Parameter`` objects
(:meth:`~Geometry.scalars`) under their own names, so checkpoint keys stay flat
(``log_curvature``, not ``geometry.log_curvature``). Moving, casting and loading a module keep
parameter objects; a tool that swaps them for new ones (``load_state_dict(assign=True)``,
``torch.func.functional_call``) would leave the geometry with the old ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliplab.objectives import lorentz as L
from cliplab.objectives.hopfield import sphere_retrieval
from cliplab.objectives.numerics import at_least_fp32


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a_i · b_i`` (B) in fp32, rounded the way an autocast matmul of fp32 inputs rounds
    (bf16 operands, fp32 sums, a bf16 result), so that a positive logit computed row by row
    equals its entry in the logits matrix."""
    device = a.device.type
    if a.dtype == b.dtype == torch.float32 and torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        return (a.to(low).float() * b.to(low).float()).sum(-1).to(low).float()
    return (a * b).sum(-1)


class Geometry:
    """Where embeddings live, and how they are scored there. Points are rows of a tensor."""

    #: the config's name for it (``objective.geometry``)
    name: str = ""
    #: whether it has an origin and entailment cones (hyperbolic space)
    cones: bool = False

    def __init__(self, cfg=None, embed_dim: int = 512) -> None:
        """``cfg`` is an :class:`cliplab.config.ObjectiveConfig`; ``embed_dim`` the model's
        projection width. The sphere needs neither."""

    def scalars(self) -> dict[str, nn.Parameter]:
        """Its learnable scalars by name, for the objective to register (none by default)."""
        return {}

    def embed(self, features: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """Raw features of ``modality`` ("image" or "text") → points, in at least fp32."""
        raise NotImplementedError

    def ensemble(self, text_features: torch.Tensor) -> torch.Tensor:
        """One class point from the raw features of its prompts (P × D → D)."""
        raise NotImplementedError

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise scores of points (B × N); larger is nearer."""
        raise NotImplementedError

    def logits(self, anchors: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale · similarity(anchors, columns)`` (B × N) in at least fp32, without keeping a
        second B × N matrix for the gradient of ``scale``."""
        raise NotImplementedError

    def positive_logits(self, anchors: torch.Tensor, partners: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale · similarity(anchor_i, partner_i)`` row by row (B), equal to the diagonal of
        :meth:`logits` (also under autocast), without a B × N matrix."""
        raise NotImplementedError

    def retrieve(self, queries: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor,
                 chunk: int | None = None) -> torch.Tensor:
        """One modern-Hopfield update, ``softmax(β · sim(q, M)) M``, back in the geometry.

        With ``chunk`` set and gradients on, the queries run in chunks whose B × N weights are
        recomputed in backward instead of kept (:meth:`_retrieve_lean`), so the retrieval holds
        no B × N matrix between forward and backward."""
        if chunk is None or not torch.is_grad_enabled():
            return self._retrieve(queries, memory, beta)
        return self._retrieve_lean(queries, memory, beta, chunk)

    def _retrieve(self, queries: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _retrieve_lean(self, queries: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor,
                       chunk: int) -> torch.Tensor:
        raise NotImplementedError

    def entailment_loss(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """MERU's cone loss on row-wise pairs: text ``texts_i`` entails image ``images_i``."""
        raise ValueError("entailment cones need the lorentz geometry")

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Its scalars to log, as detached 0-dim tensors."""
        return {}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project its scalars back into their allowed range (after every optimizer step)."""


class Sphere(Geometry):
    """The unit sphere: points are unit vectors, scored by cosine."""

    name = "euclidean"

    def embed(self, features, modality="image"):
        return F.normalize(at_least_fp32(features), dim=-1)

    def ensemble(self, text_features):
        """Normalise, mean, normalise."""
        return F.normalize(F.normalize(at_least_fp32(text_features), dim=-1).mean(dim=0), dim=-1)

    def similarity(self, a, b):
        return a @ b.T

    def logits(self, anchors, columns, scale):
        return at_least_fp32((scale * anchors) @ columns.T)  # s scales the B anchors, not the B × N scores

    def positive_logits(self, anchors, partners, scale):
        return _rowwise_dot(scale * at_least_fp32(anchors), at_least_fp32(partners))

    def _retrieve(self, queries, memory, beta):
        weights = torch.softmax(at_least_fp32((beta * queries) @ memory.T), dim=1)  # β scales the B queries
        return F.normalize(weights @ memory, dim=-1)

    def _retrieve_lean(self, queries, memory, beta, chunk):
        """:func:`hopfield.sphere_retrieval`'s FlashAttention-style backward, which recomputes
        only the scores."""
        return F.normalize(sphere_retrieval(queries, memory, beta, chunk), dim=-1)


class Hyperboloid(Geometry):
    """The hyperboloid of curvature ``-c`` (space components; :mod:`cliplab.objectives.lorentz`),
    scored by negative geodesic distance. Raw features are scaled by a learnable α per modality
    and lifted by ``exp_map0``; ``c`` is learnable when ``cfg.learn_curvature``. α starts at
    ``cfg.alpha_init``, else ``embed_dim ** -0.5``."""

    name = "lorentz"
    cones = True

    def __init__(self, cfg, embed_dim: int = 512) -> None:
        alpha = cfg.alpha_init if cfg.alpha_init is not None else embed_dim ** -0.5
        self.log_alpha_image = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_alpha_text = nn.Parameter(torch.tensor(math.log(alpha)))
        self.log_curvature = nn.Parameter(torch.tensor(math.log(cfg.curvature_init)),
                                          requires_grad=cfg.learn_curvature)
        self.log_curvature_range = (math.log(cfg.curvature_min), math.log(cfg.curvature_max))
        #: MERU's cone constant K: the half-aperture is ``asin(2K / (√c‖x‖))``
        self.aperture_k: float = cfg.aperture_k

    def scalars(self):
        return {"log_alpha_image": self.log_alpha_image, "log_alpha_text": self.log_alpha_text,
                "log_curvature": self.log_curvature}

    @property
    def curvature(self) -> torch.Tensor:
        """The (positive) curvature magnitude ``c``, with gradient."""
        return self.log_curvature.exp()

    def embed(self, features, modality="image"):
        """``exp_map0(α · f)`` with the modality's α."""
        alpha = (self.log_alpha_image if modality == "image" else self.log_alpha_text).exp()
        return L.exp_map0(alpha * at_least_fp32(features), self.curvature)

    def ensemble(self, text_features):
        """The tangent-space mean before the lift (not the mean of lifted points)."""
        return L.exp_map0(self.log_alpha_text.exp() * at_least_fp32(text_features).mean(dim=0), self.curvature)

    def similarity(self, a, b):
        return -L.distance(a, b, self.curvature)

    def logits(self, anchors, columns, scale):
        """:func:`lorentz.scaled_neg_distance`, which keeps only the points for backward."""
        return L.scaled_neg_distance(anchors, columns, self.curvature, scale)

    def positive_logits(self, anchors, partners, scale):
        return -scale * L.paired_distance(anchors, partners, self.curvature)

    def _retrieve(self, queries, memory, beta):
        """Weights by ``−β · distance``, averaged in the origin's tangent space, then lifted."""
        c = self.curvature
        weights = torch.softmax(L.scaled_neg_distance(queries, memory, c, beta), dim=1)
        return L.exp_map0(L.tangent_mean(weights, memory, c), c)

    def _retrieve_lean(self, queries, memory, beta, chunk):
        """Activation checkpointing of :meth:`_retrieve`, one query chunk at a time."""
        return torch.cat([checkpoint(self._retrieve, q, memory, beta, use_reentrant=False)
                          for q in queries.split(chunk)])

    def entailment_loss(self, images, texts):
        return torch.relu(L.cone_violation(texts, images, self.curvature, self.aperture_k)).mean()

    def metric_tensors(self):
        return {"scalars/curvature": self.curvature.detach(),
                "scalars/alpha_image": self.log_alpha_image.detach().exp(),
                "scalars/alpha_text": self.log_alpha_text.detach().exp()}

    @torch.no_grad()
    def clamp_(self):
        """c ∈ [c_min, c_max]; α ≤ 1."""
        self.log_curvature.clamp_(*self.log_curvature_range)
        self.log_alpha_image.clamp_(max=0.0)
        self.log_alpha_text.clamp_(max=0.0)


GEOMETRIES: dict[str, type[Geometry]] = {"euclidean": Sphere, "lorentz": Hyperboloid}
  # by objective.geometry
