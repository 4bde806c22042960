"""Contrastive objectives. Ray-free: they see local features and a :class:`DistContext`.

May import: distributed, errors (the foundations). Never models, config or anything above.
"""

from cliplab.objectives.base import DataNeeds, LossOutput, Objective
from cliplab.objectives.family import PRESETS, ContrastiveObjective, data_needs, resolve
from cliplab.objectives.geometry import Geometry, Hyperboloid, Sphere

__all__ = ["PRESETS", "ContrastiveObjective", "DataNeeds", "Geometry", "Hyperboloid", "LossOutput", "Objective",
           "Sphere", "build_objective", "data_needs", "resolve"]


def build_objective(cfg, embed_dim: int = 512) -> Objective:
    """Build the objective an :class:`cliplab.config.ObjectiveConfig` describes.
    ``embed_dim`` (the model's projection width) sets MERU's α init."""
    return ContrastiveObjective(cfg, embed_dim)
