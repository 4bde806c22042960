"""The Lorentz (hyperboloid) model of hyperbolic space, as pure functions.

Points are stored by their *space* components ``x ∈ R^D``; the time component is implied,
``t(x) = sqrt(1/c + ‖x‖²)``, so every stored point lies on the hyperboloid of curvature ``-c``.
All functions compute in float32 or wider (bf16 is off by 4–14 logits here) and use
dtype-aware epsilons. ``c`` is a positive scalar tensor.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from cliplab.objectives.numerics import at_least_fp32


def eps_for(dtype: torch.dtype) -> float:
    """The smallest epsilon that still moves ``1 + eps`` in ``dtype`` (≥ 1e-6 in fp32)."""
    return max(1e-6, 4 * torch.finfo(dtype).eps) if dtype != torch.float64 else 1e-12


def tangent_mean(weights: torch.Tensor, memory: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The weighted mean ``Σ_j w_ij log_map0(m_j)`` in the origin's tangent space (B × D), in
    fp32 whatever the autocast state; :func:`exp_map0` lifts it back."""
    with torch.autocast(memory.device.type, enabled=False):
        return at_least_fp32(weights) @ log_map0(at_least_fp32(memory), c)


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


def paired_distance(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row-wise geodesic distances ``d(x_i, y_i)`` (shape B), clamped as in :func:`distance`."""
    x, y = at_least_fp32(x), at_least_fp32(y)
    eps = eps_for(x.dtype)
    inner_xy = (x * y).sum(-1) - time_component(x, c) * time_component(y, c)
    return torch.acosh(torch.clamp(-c * inner_xy, min=1 + eps)) / torch.sqrt(c)


def _no_autocast(device_type: str):
    """Matmuls in the inputs' own (fp32) dtype, not autocast's bf16: ``t t' − x·y`` cancels
    in reduced precision, and acosh near 1 magnifies the error. TF32 stays as the process set
    it (``train.tf32``). Measured mean |logit error| for D = 512 pairs at distance 0.23, scale
    14.3: 0.002 with TF32-rounded inputs, 0.012 with bf16 inputs (before bf16's output rounding);
    at distance 0.06, 0.006 against 0.05."""
    return torch.autocast(device_type, enabled=False)


def _neg_inner_inplace(xy, tx, ty):
    """``t(x_i) t(y_j) − x_i·y_j = −⟨x_i, y_j⟩_L`` (B × N) from the matmul ``xy``, overwriting it."""
    return xy.neg_().addcmul_(tx[:, None], ty[None, :])


def _forward_pointwise(xy, tx, ty, c, s, eps: float):
    """Logits from ``xy = x·yᵀ``: with ``p = t t' − x·y``, ``−s · acosh(max(c·p, 1 + eps)) / √c``."""
    p = tx[:, None] * ty[None, :] - xy
    return torch.acosh(torch.clamp(c * p, min=1 + eps)) * (-s / torch.sqrt(c))


def _backward_pointwise(xy, tx, ty, grad, c, s, eps: float):
    """From ``xy = x·yᵀ`` and the logits' gradient ``G``: ``(∂L/∂p, Σ G·d, Σ (∂L/∂u)·u)`` with
    ``p = t t' − x·y`` and ``u = c·p``, where ``∂logit/∂u = −s / (√c · sqrt(u² − 1))`` and the
    clamp passes gradient."""
    u = c * (tx[:, None] * ty[None, :] - xy)
    uc = torch.clamp(u, min=1 + eps)
    sqrt_c = torch.sqrt(c)
    g_u = torch.where(u >= 1 + eps, grad * (-s) / (sqrt_c * torch.sqrt(uc * uc - 1)), 0.0)
    return g_u * c, (grad * torch.acosh(uc)).sum() / sqrt_c, (g_u * uc).sum()


def _forward_pointwise_inplace(xy, tx, ty, c, s, eps: float):
    """:func:`_forward_pointwise` overwriting ``xy``."""
    return _neg_inner_inplace(xy, tx, ty).mul_(c).clamp_(min=1 + eps).acosh_().mul_(-s / torch.sqrt(c))


def _backward_pointwise_inplace(xy, tx, ty, grad, c, s, eps: float):
    """:func:`_backward_pointwise` overwriting ``xy``, with one more B × N buffer."""
    sqrt_c = torch.sqrt(c)
    u = _neg_inner_inplace(xy, tx, ty).mul_(c)
    live = u >= 1 + eps
    u.clamp_(min=1 + eps)
    w = torch.acosh(u)
    sum_gd = w.mul_(grad).sum() / sqrt_c
    torch.mul(u, u, out=w).sub_(1).sqrt_().mul_(sqrt_c).reciprocal_().mul_(grad).mul_(-s).mul_(live)
    del live
    sum_gu_u = u.mul_(w).sum()
    return w.mul_(c), sum_gd, sum_gu_u


@functools.cache
def _fused(fn):
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _pointwise(fn, inplace, *args):
    """On CUDA, ``fn`` fused by torch.compile into one pass over the B × N matrix; elsewhere
    (or if compiling fails) the eager in-place variant."""
    global _COMPILE_FAILED
    if args[0].is_cuda and not _COMPILE_FAILED:
        try:
            return _fused(fn)(*args)
        except Exception as e:  # noqa: BLE001 - e.g. no Triton on this node: stay correct, warn once
            _COMPILE_FAILED = True
            warnings.warn(f"Lorentz logits: torch.compile failed ({type(e).__name__}: {e}); running eagerly",
                          stacklevel=2)
    return inplace(*args)


_COMPILE_FAILED = False


class _ScaledNegDistance(torch.autograd.Function):
    """``−s · distance(x, y)`` (B × N) with a hand-written backward that keeps no B × N tensor
    between forward and backward: the Lorentz inner products are recomputed (one matmul). The
    elementwise steps are one fused kernel on CUDA, in-place passes elsewhere."""

    @staticmethod
    def forward(ctx, x, y, c, s):
        with _no_autocast(x.device.type):
            tx, ty = time_component(x, c), time_component(y, c)
            logits = _pointwise(_forward_pointwise, _forward_pointwise_inplace, x @ y.T, tx, ty, c, s,
                                eps_for(x.dtype))
        ctx.save_for_backward(x, y, c, s, tx, ty)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, y, c, s, tx, ty = ctx.saved_tensors
        with _no_autocast(x.device.type):
            g, sum_gd, sum_gu_u = _pointwise(_backward_pointwise, _backward_pointwise_inplace,
                                             x @ y.T, tx, ty, grad.to(x.dtype), c, s, eps_for(x.dtype))
            grad_s = -sum_gd  # logits = −s·d
            # c enters through the 1/√c factor of d, through u = c·p at fixed points, and through
            # t = sqrt(1/c + ‖·‖²), with ∂t/∂c = −1 / (2c² t)
            g_tx, g_ty = g @ ty, g.T @ tx  # g = ∂L/∂(t t' − x·y)
            grad_c = sum_gd * s / (2 * c) + sum_gu_u / c - ((g_tx / tx).sum() + (g_ty / ty).sum()) / (2 * c**2)
            grad_x = torch.addmm(g_tx[:, None] * x / tx[:, None], g, y, alpha=-1)
            grad_y = torch.addmm(g_ty[:, None] * y / ty[:, None], g.T, x, alpha=-1)
        return grad_x, grad_y, grad_c.reshape(c.shape), grad_s.reshape(s.shape)


def scaled_neg_distance(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Logits ``−s · distance(x_i, y_j)`` (B × N), memory-lean: equal to ``-s * distance(x, y, c)``
    with the same clamp, but autograd keeps only ``x``, ``y`` and the scalars (a B × N matrix
    would otherwise be kept for each of the five elementwise steps). Computes in at least fp32."""
    return _ScaledNegDistance.apply(at_least_fp32(x), at_least_fp32(y), c, s)


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


def cone_violation(texts: torch.Tensor, images: torch.Tensor, c: torch.Tensor, k: float = 0.1) -> torch.Tensor:
    """How far image ``images_i`` lies outside the entailment cone of text ``texts_i`` (row-wise
    pairs, shape B, radians): ``oxy_angle(texts_i, images_i) − half_aperture(texts_i)``; ≤ 0
    inside the cone (MERU)."""
    return oxy_angle(texts, images, c) - half_aperture(texts, c, k)


def origin_distance(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Geodesic distance of each point to the origin ``(1/√c, 0)``:
    ``acosh(√c · t(x)) / √c = asinh(√c ‖x‖) / √c`` (the second form, stable near 0)."""
    return torch.asinh(torch.sqrt(c) * x.norm(dim=-1)) / torch.sqrt(c)
