"""The Lorentz (hyperboloid) model of hyperbolic space, as pure functions.

Points are stored by their *space* components ``x ∈ R^D``; the time component is implied,
``t(x) = sqrt(1/c + ‖x‖²)``, so every stored point lies on the hyperboloid of curvature ``-c``.
All functions compute in float32 or wider (bf16 is off by 4–14 logits here) and use
dtype-aware epsilons. ``c`` is a positive scalar tensor.
"""

from __future__ import annotations

import math

import torch


def eps_for(dtype: torch.dtype) -> float:
    """The smallest epsilon that still moves ``1 + eps`` in ``dtype`` (≥ 1e-6 in fp32)."""
    return max(1e-6, 4 * torch.finfo(dtype).eps) if dtype != torch.float64 else 1e-12


def time_component(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``t(x) = sqrt(1/c + ‖x‖²)`` of shape ``x.shape[:-1]``."""
    return torch.sqrt(1 / c + (x * x).sum(-1))


def inner(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Pairwise Lorentzian inner products ``⟨x_i, y_j⟩_L = x_i·y_j − t(x_i) t(y_j)`` (B × N)."""
    return x @ y.T - time_component(x, c)[:, None] * time_component(y, c)[None, :]


def distance(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Pairwise geodesic distances ``acosh(max(−c⟨x, y⟩_L, 1 + eps)) / √c`` (B × N).

    The clamp keeps identical points (where acosh' is infinite) at a finite gradient: the
    derivative of the clamped branch is 0 there, so gradients stay finite."""
    eps = eps_for(x.dtype)
    arg = torch.clamp(-c * inner(x, y, c), min=1 + eps)
    return torch.acosh(arg) / torch.sqrt(c)


def exp_map0(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Lift a tangent vector at the origin onto the hyperboloid (space components):
    ``sinh(√c‖v‖) · v / (√c‖v‖)``, with the sinh input clamped to ``[eps, asinh(2^15)]``."""
    eps = eps_for(v.dtype)
    rc_norm = torch.sqrt(c) * v.norm(dim=-1, keepdim=True)
    rc_norm = torch.clamp(rc_norm, min=eps, max=math.asinh(2**15))
    return torch.sinh(rc_norm) * v / rc_norm


def log_map0(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`exp_map0`: the tangent vector at the origin that lifts to ``x``."""
    eps = eps_for(x.dtype)
    rc_xnorm = torch.clamp(torch.sqrt(c) * x.norm(dim=-1, keepdim=True), min=eps)
    return torch.asinh(rc_xnorm) * x / rc_xnorm


def half_aperture(x: torch.Tensor, c: torch.Tensor, k: float = 0.1) -> torch.Tensor:
    """Half-aperture of the entailment cone at ``x``: ``asin(2K / (√c‖x‖))``, clamped inside ±1."""
    eps = eps_for(x.dtype)
    arg = 2 * k / (torch.sqrt(c) * x.norm(dim=-1) + eps)
    return torch.asin(torch.clamp(arg, -1 + eps, 1 - eps))


def oxy_angle(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exterior angle at ``x`` between the origin and ``y`` (row-wise pairs, shape B):
    ``acos((t(y) + c⟨x, y⟩_L · t(x)) / (‖x‖ · sqrt((c⟨x, y⟩_L)² − 1)))``, clamped inside ±1."""
    eps = eps_for(x.dtype)
    tx, ty = time_component(x, c), time_component(y, c)
    c_inner = c * ((x * y).sum(-1) - tx * ty)
    numer = ty + c_inner * tx
    denom = x.norm(dim=-1) * torch.sqrt(torch.clamp(c_inner**2 - 1, min=eps)) + eps
    return torch.acos(torch.clamp(numer / denom, -1 + eps, 1 - eps))
