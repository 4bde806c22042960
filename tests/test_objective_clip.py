"""CLIP's loss against an independent float64 reference, and exactness under 2 gloo processes."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliplab.config import ObjectiveConfig
from cliplab.distributed import DistContext
from cliplab.objectives import build_objective


def reference_clip_loss(x: np.ndarray, y: np.ndarray, log_scale: float) -> float:
    """Straight from the spec in float64: symmetric CE over the full N×N cosine logits."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    logits = math.exp(log_scale) * x @ y.T

    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return (ce(logits) + ce(logits.T)) / 2


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f(x)
        x[idx] = old - eps
        lo = f(x)
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


def test_clip_loss_and_grads_match_float64_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    obj = build_objective(ObjectiveConfig(name="clip", temperature=0.1)).double()
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(y, requires_grad=True)
    out = obj.loss(xt, yt, DistContext())
    # embed() casts to float32 for numerics; compare at float32 precision of the features
    ref = reference_clip_loss(x, y, math.log(10.0))
    assert out.loss.item() == pytest.approx(ref, abs=1e-5)
    out.loss.backward()
    gx = numeric_grad(lambda a: reference_clip_loss(a, y, math.log(10.0)), x.copy())
    np.testing.assert_allclose(xt.grad.numpy(), gx, atol=1e-5)
    assert obj.log_scale.grad is not None and torch.isfinite(obj.log_scale.grad)


def test_logit_scale_is_stored_as_log_and_clamped():
    obj = build_objective(ObjectiveConfig(name="clip", temperature=0.07, max_logit_scale=100.0))
    assert obj.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        obj.log_scale.fill_(10.0)
    obj.clamp_()
    assert obj.log_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        obj.log_scale.fill_(-3.0)
    obj.clamp_()
    assert obj.log_scale.item() == 0.0
    frozen = build_objective(ObjectiveConfig(name="clip", learn_temperature=False))
    assert not frozen.log_scale.requires_grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, y, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        obj = build_objective(ObjectiveConfig(name="clip", temperature=0.1))
        b = len(x) // world
        xs = x[rank * b:(rank + 1) * b].clone().requires_grad_()
        ys = y[rank * b:(rank + 1) * b].clone().requires_grad_()
        out = obj.loss(xs, ys, DistContext.current())
        out.loss.backward()
        # DDP averages parameter gradients across ranks; the scalar's gradient is averaged here too
        g_scale = obj.log_scale.grad.clone()
        dist.all_reduce(g_scale)
        queue.put((rank, out.loss.item(), xs.grad.numpy(), ys.grad.numpy(), g_scale.item() / world))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_full_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    obj = build_objective(ObjectiveConfig(name="clip", temperature=0.1))
    xf, yf = x.clone().requires_grad_(), y.clone().requires_grad_()
    full = obj.loss(xf, yf, DistContext())
    full.loss.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, x, y, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # mean of the per-rank local losses is the global loss
    assert np.mean([r[1] for r in results]) == pytest.approx(full.loss.item(), abs=1e-6)
    # each rank's feature gradient (after DDP's 1/W averaging) equals the full-batch gradient rows
    gx = np.concatenate([r[2] for r in results]) / 2
    gy = np.concatenate([r[3] for r in results]) / 2
    np.testing.assert_allclose(gx, xf.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(gy, yf.grad.numpy(), atol=1e-6)
    assert results[0][4] == pytest.approx(obj.log_scale.grad.item(), abs=1e-6)
