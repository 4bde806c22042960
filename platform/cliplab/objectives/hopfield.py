"""Modern-Hopfield retrieval on the unit sphere, with a memory-lean exact backward.

One retrieval is ``softmax(β · q Mᵀ) M``: attention with keys = values = ``M`` and scale β.
At head dimension 512 PyTorch's fused attention kernels don't apply, and plain autograd keeps
the B × N softmax weights for backward. :func:`sphere_retrieval` instead works like
FlashAttention's backward, in chunks of queries:

- forward keeps only the queries, the memory, the output ``O`` (B × D) and each row's
  logsumexp ``ℓ`` (B);
- backward recomputes the scores ``S = β q Mᵀ`` by one matmul and gets the weights back as
  ``P = exp(S − ℓ)`` without a second softmax. With ``δ_i = dO_i · O_i`` (the softmax
  backward's row sums, read off B × D tensors), ``dS = P ⊙ (dO Mᵀ − δ)``, and then
  ``dq = β dS M``, ``dM = Pᵀ dO + β dSᵀ q`` and ``dβ = Σ_i q_i · (dS M)_i``.

That is 2 matmuls forward and 5 backward per retrieval (activation checkpointing of the plain
version costs 8: it recomputes the output too), and no B × N tensor lives between forward and
backward. Pure math: no Ray, no module state.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from cliplab.objectives.numerics import at_least_fp32


def _scores(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``q Mᵀ`` (rows × N), promoted to at least float32 (an autocast matmul returns bf16)."""
    return at_least_fp32(queries @ memory.T)


class _SphereRetrieval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, memory, beta, chunk):
        outs, lses = [], []
        for q in queries.split(chunk):
            s = _scores(beta * q, memory)
            lse = torch.logsumexp(s, dim=1, keepdim=True)
            weights = s.sub_(lse).exp_()  # in place: one B × N buffer per chunk
            outs.append(at_least_fp32(weights @ memory))
            lses.append(lse)
        out = torch.cat(outs)
        lse = torch.cat(lses)
        ctx.save_for_backward(queries, memory, beta, out, lse)
        ctx.chunk = chunk
        device = queries.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        queries, memory, beta, out, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grad_out = grad_out.to(out.dtype)
        delta = (grad_out * out).sum(dim=1, keepdim=True)  # δ_i = dO_i · O_i
        grad_q, grad_m = [], torch.zeros_like(memory, dtype=out.dtype)
        grad_beta = torch.zeros((), dtype=out.dtype, device=out.device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=enabled):  # as in forward
            for q, g, l_, d in zip(
                queries.split(ctx.chunk),
                grad_out.split(ctx.chunk),
                lse.split(ctx.chunk),
                delta.split(ctx.chunk),
                strict=True,
            ):
                bq = beta * q
                weights = _scores(bq, memory).sub_(l_).exp_()
                ds = _scores(g, memory).sub_(d).mul_(weights)  # dL/dS, S = β q Mᵀ
                ds_m = (ds @ memory).to(out.dtype)  # B × D: gives dq and dβ
                grad_q.append(beta * ds_m)
                grad_beta = grad_beta + (q.to(out.dtype) * ds_m).sum()
                grad_m.add_(weights.T @ g).add_(ds.T @ bq)
        return (
            torch.cat(grad_q).to(queries.dtype),
            grad_m.to(memory.dtype),
            grad_beta.to(beta.dtype) if ctx.needs_input_grad[2] else None,
            None,
        )


def sphere_retrieval(
    queries: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """``softmax(β · q Mᵀ) M`` (B × D), *not* normalised, with the lean backward above.

    Args:
        queries: B × D query points (rows of unit norm on the sphere, though any rows work).
        memory: N × D stored patterns; keys and values both.
        beta: 0-dim inverse temperature β > 0 (may require grad).
        chunk: queries per chunk; bounds the transient B × N buffers to ``chunk × N``.
            ``None`` runs all queries as one chunk.

    Scores, logsumexps and weights are at least float32; under autocast the four matmul kinds
    run in the autocast dtype, in forward and backward alike.
    """
    return _SphereRetrieval.apply(queries, memory, beta, chunk or max(1, queries.shape[0]))
