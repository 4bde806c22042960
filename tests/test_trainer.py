"""The Ray-free trainer parts: gradient accumulation with cached features (fp64, 1 and 2 gloo
ranks), clipping, the non-finite guard, FLOP counting, torn checkpoints."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliplab.config import ExperimentConfig, ModelConfig, ObjectiveConfig, OptimConfig
from cliplab.distributed import DistContext
from cliplab.models import DualEncoder, build_model, freeze_text_tower
from cliplab.objectives import build_objective
from cliplab.train.step import (
    NonFiniteGuard,
    NonFiniteLossError,
    build_optimizer,
    compute_gradients,
    cosine_with_warmup,
    train_step,
)

N = 8  # the whole batch


def _module(objective: str, seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig(name=objective), bundle.embed_dim))
    if not module.objective.needs_text:
        freeze_text_tower(module.model)
    return module.double()


def _batch(objective: str, n: int = N, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bundle_tok = build_model(ModelConfig(name="cliplab-tiny")).tokenizer
    batch = {"image": torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64),
             "text": bundle_tok([f"caption number {i % 5}" for i in range(n)])}
    if objective == "xclr":
        batch["image_2"] = torch.randn(n, 3, 64, 64, generator=g, dtype=torch.float64)
        batch["caption_embedding"] = torch.nn.functional.normalize(torch.randn(n, 16, generator=g,
                                                                               dtype=torch.float64), dim=-1)
    return batch


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["clip", "siglip", "cloob", "meru", "xclr"])
@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_k_micro_batches_equals_one_big_batch_in_fp64(objective, k):
    full, accum = _module(objective), _module(objective)
    batch = _batch(objective)
    out_full = compute_gradients(full, batch, DistContext())
    out_accum = compute_gradients(accum, batch, DistContext(), accum_steps=k)
    assert out_accum.loss.item() == pytest.approx(out_full.loss.item(), abs=1e-10)
    g_full, g_accum = _grads(full), _grads(accum)
    learns_scalars = any(p.requires_grad for p in full.objective.parameters())  # CLOOB's τ and β are fixed
    assert g_full.keys() == g_accum.keys()
    assert any(n.startswith("objective.") for n in g_full) == learns_scalars
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], rtol=0, atol=1e-5, msg=name)


def _accum_rank(rank, world, port, k, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module("cloob")
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        batch = _batch("cloob")
        b = N // world
        local = {key: v[rank * b:(rank + 1) * b] for key, v in batch.items()}
        out = compute_gradients(ddp, local, DistContext.current(), accum_steps=k)
        queue.put((rank, out.loss.item(), {n: g.numpy() for n, g in _grads(module).items()}))
        dist.barrier()  # both ranks are done with gloo before either tears it down (an early teardown aborted a rank)
    finally:
        dist.destroy_process_group()


def test_accumulation_under_two_gloo_ranks_equals_one_process():
    """2 DDP ranks × 2 micro-batches each = 1 process on the whole batch (CLOOB: global memories)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_accum_rank, args=(r, 2, port, 2, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (loss, g)) for r, loss, g in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _module("cloob")
    out = compute_gradients(single, _batch("cloob"), DistContext())
    assert np.mean([results[r][0] for r in (0, 1)]) == pytest.approx(out.loss.item(), abs=1e-8)
    for name, g in _grads(single).items():
        # DDP averaged the ranks' gradients; both ranks hold the same result
        np.testing.assert_allclose(results[0][1][name], g.numpy(), rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(results[1][1][name], g.numpy(), rtol=0, atol=1e-12, err_msg=name)


def test_uneven_micro_batches_are_refused():
    with pytest.raises(ValueError, match="micro-batches"):
        compute_gradients(_module("clip"), _batch("clip", n=6), DistContext(), accum_steps=4)


def _step_setup(objective="clip"):
    module = _module(objective).float()
    opt = build_optimizer(module, OptimConfig(lr=1e-3, warmup_steps=0))
    return module, opt, cosine_with_warmup(opt, 0, 100)


def test_gradient_clipping_bounds_the_update_norm():
    module, opt, sched = _step_setup()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in _batch("clip").items()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    metrics = train_step(module, batch, opt, sched, DistContext(), grad_clip_norm=1e-3)
    assert metrics["train/grad_norm"] > 1e-3  # the pre-clip norm is reported
    clipped = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in module.parameters() if p.grad is not None))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-4)
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())


def test_without_clipping_the_step_reports_the_gradient_norm_and_leaves_gradients_alone():
    module, opt, sched = _step_setup()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in _batch("clip").items()}
    metrics = train_step(module, batch, opt, sched, DistContext())
    grads = [p.grad.double() for p in module.parameters() if p.grad is not None]
    assert len(grads) > 10
    expected = float(torch.sqrt(sum((g**2).sum() for g in grads)))  # the float64 norm of the unclipped gradients
    assert metrics["train/grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_the_optimizer_uses_the_fused_kernel_only_when_asked_or_on_cuda():
    module, _, _ = _step_setup()
    assert not build_optimizer(module, OptimConfig()).defaults["fused"]  # CPU parameters: auto is off
    assert build_optimizer(module, OptimConfig(fused=True)).defaults["fused"]


def test_a_non_finite_loss_skips_the_step_and_changes_nothing():
    module, opt, sched = _step_setup()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in _batch("clip").items()}
    batch["image"][0, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lr_before = sched.get_last_lr()[0]
    metrics = train_step(module, batch, opt, sched, DistContext())
    assert metrics["train/nonfinite"] == 1.0 and "train/loss" not in metrics
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
    assert sched.get_last_lr()[0] == lr_before and not opt.state  # no AdamW moments were touched


def test_a_non_finite_gradient_under_a_finite_loss_also_skips_the_step():
    module, opt, sched = _step_setup()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in _batch("clip").items()}
    weight = next(p for n, p in module.named_parameters() if n.endswith("proj") or "proj" in n)
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # an overflowing gradient
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    metrics = train_step(module, batch, opt, sched, DistContext())
    hook.remove()
    assert metrics["train/nonfinite"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters()) and not opt.state
    assert train_step(module, batch, opt, sched, DistContext())["train/nonfinite"] == 0.0  # then it trains on


def test_the_guard_counts_skips_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(limit=3)
    bad, good = {"train/nonfinite": 1.0}, {"train/nonfinite": 0.0}
    assert guard.update(bad, 5) and guard.update(bad, 5)
    assert not guard.update(good, 6)  # a good step resets the run of bad ones
    assert guard.update(bad, 7) and guard.update(bad, 7)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row after step 7 \\(5 skipped"):
        guard.update(bad, 7)


def test_flop_counter_counts_a_matmul_forward_and_backward():
    from cliplab.train.metering import count_flops

    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64)

    def step():
        (x @ w).sum().backward()
        return "done"

    out, flops = count_flops(step)
    assert out == "done" and flops == 2 * (2 * 16 * 64 * 32)  # forward + the backward for w (x needs none)


# ---------------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_killed_mid_write_is_never_loaded_and_the_previous_one_is(tmp_path):
    """A writer SIGKILLed between files leaves a folder without COMPLETE: loading it is a clear
    error, and the run folder's latest checkpoint is still the earlier, complete one."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from cliplab.config import ExperimentConfig
        from cliplab.models import DualEncoder, build_model
        from cliplab.objectives import build_objective
        from cliplab import checkpoint as ckpt
        from cliplab.train.step import build_optimizer, cosine_with_warmup
        cfg = ExperimentConfig()
        b = build_model(cfg.model)
        m = DualEncoder(b.model, build_objective(cfg.objective, b.embed_dim))
        opt = build_optimizer(m, cfg.optim)
        sched = cosine_with_warmup(opt, 1, 10)
        run = Path({str(tmp_path)!r}) / "run"
        ckpt.save_checkpoint(run / "checkpoint_000000", m, opt, sched, step=10, epoch=0, cfg=cfg)
        real_save = torch.save
        def dying_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if str(path).endswith("objective.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ckpt.save_checkpoint(run / "checkpoint_000001", m, opt, sched, step=20, epoch=0, cfg=cfg)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    from cliplab import checkpoint as ckpt

    run = tmp_path / "run"
    torn = run / "checkpoint_000001"
    assert (torn / "model.pt").is_file() and not ckpt.is_complete(torn)
    assert ckpt.latest_checkpoint(run) == run / "checkpoint_000000"
    with pytest.raises(ckpt.IncompleteCheckpointError, match="incomplete checkpoint"):
        ckpt.load_trainer_state(torn)
    cfg = ExperimentConfig()
    b = build_model(cfg.model)
    module = DualEncoder(b.model, build_objective(cfg.objective, b.embed_dim))
    ckpt.load_weights(run / "checkpoint_000000", module)
    assert ckpt.load_trainer_state(run / "checkpoint_000000")["step"] == 10
