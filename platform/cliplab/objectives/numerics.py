"""Numeric helpers every objective module shares (below :mod:`~cliplab.objectives.base` and the geometries)."""

from __future__ import annotations

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when float64 (references and tests run in float64)."""
    return t if t.dtype == torch.float64 else t.float()
