"""Contrastive objectives. Ray-free: they see local features and a :class:`DistContext`.

May import: distributed, errors (the foundations). Never models, config or anything above.
"""

from cliplab.objectives.base import LossOutput, Objective
from cliplab.objectives.family import PRESETS, ContrastiveObjective, resolve

__all__ = ["PRESETS", "ContrastiveObjective", "LossOutput", "Objective", "build_objective", "resolve"]


def build_objective(cfg, embed_dim: int = 512) -> Objective:
    """Build the objective an :class:`cliplab.config.ObjectiveConfig` describes.
    ``embed_dim`` (the model's projection width) sets MERU's α init."""
    return ContrastiveObjective(cfg, embed_dim)
