"""Contrastive objectives. Ray-free: they see local features and a :class:`DistContext`."""

from cliplab.objectives.base import LossOutput, Objective
from cliplab.objectives.clip import ClipObjective

OBJECTIVES: dict[str, type[Objective]] = {"clip": ClipObjective}

__all__ = ["OBJECTIVES", "ClipObjective", "LossOutput", "Objective", "build_objective"]


def build_objective(cfg) -> Objective:
    """Build the objective named by an :class:`cliplab.config.ObjectiveConfig`."""
    return OBJECTIVES[cfg.name](cfg)
