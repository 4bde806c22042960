"""The objective interface every contrastive loss implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from cliplab.distributed import DistContext

if TYPE_CHECKING:
    from cliplab.objectives.geometry import Geometry


@dataclass(frozen=True)
class DataNeeds:
    """What an objective needs from the data beyond one image view and its caption."""

    #: augmented views of each image (2: ``extras["image_features_2"]`` from the second view)
    views: int = 1
    #: per-sample caption embeddings (``extras["caption_embeddings"]``, joined by key from
    #: ``data.caption_embeddings``)
    caption_embeddings: bool = False


@dataclass
class LossOutput:
    """The scalar to backprop, and named terms worth logging (detached by the caller)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """An ``nn.Module`` owning its learnable scalars (none of which get weight decay).

    - :meth:`loss`: local image/text features (B × D) plus optional per-sample ``extras``
      → :class:`LossOutput`, exact under data parallelism through ``ctx``.
    - :meth:`embed` / :meth:`similarity`: the map into the objective's :attr:`geometry` and its
      score, used by evaluation so every objective is judged in its own space.
    - :meth:`metric_tensors` / :meth:`metrics`: scalars to log. :meth:`clamp_`: applied after every optimizer step.
    """

    #: False when the loss never looks at text features (then the text tower is frozen)
    needs_text: bool = True
    #: multiplies the optimizer's lr (``build_optimizer``): how large a step this loss tolerates
    lr_scale: float = 1.0
    #: what the loader must deliver (views, caption embeddings)
    data_needs: DataNeeds = DataNeeds()
    #: where its embeddings live (:mod:`cliplab.objectives.geometry`); evaluation reads it
    geometry: Geometry

    def loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ctx: DistContext,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> LossOutput:
        raise NotImplementedError

    def embed(self, features: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """Raw features of ``modality`` ("image" or "text") → points in the geometry."""
        return self.geometry.embed(features, modality)

    def ensemble(self, text_features: torch.Tensor) -> torch.Tensor:
        """One class embedding from the raw features of its prompts, in the geometry."""
        return self.geometry.ensemble(text_features)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Pairwise scores of points in the geometry (larger is nearer)."""
        return self.geometry.similarity(a, b)

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Scalars to log, as detached 0-dim tensors (read with the step's one host sync)."""
        return {}

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metric_tensors().items()}

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project learnable scalars back into their allowed range."""
