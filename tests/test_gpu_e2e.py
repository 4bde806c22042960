"""The GPU path end to end, on a real CUDA GPU (skipped without one): ``cliplab train`` with a val
set on one GPU worker, a two-trial sweep with fractional GPUs, and ``cliplab eval`` on the GPU.

``bench/gpu_checks.sh`` runs this suite first. It needs no S3, MLflow or fonts: a synthetic corpus
(coloured shapes named by their captions) on local disk and a local Ray, so a lent GPU machine runs
it with the wheel set that the script installs. ``CLIPLAB_GPU_CHECKS_SMOKE=1`` runs the same tests on
the CPU (no GPU asked for): a check of the suite's plumbing, not of the GPU path.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
import torch

SMOKE = os.environ.get("CLIPLAB_GPU_CHECKS_SMOKE") == "1"
GPU = not SMOKE
pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def _image(colour: str, shape: str, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (245, 245, 245))
    draw = ImageDraw.Draw(im)
    x, y, r = rng.randint(16, 48), rng.randint(16, 48), rng.randint(8, 14)
    box = (x - r, y - r, x + r, y + r)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from cliplab.data.shards import Sample, write_splits

    rng = random.Random(0)
    samples = [Sample(f"s{i:05d}", _image(c, s, rng), "png", f"a {c} {s}")
               for i in range(384) for c, s in [(rng.choice(list(COLOURS)), rng.choice(SHAPES))]]
    out = tmp_path_factory.mktemp("shapes")
    write_splits(samples, out, val_fraction=0.25, seed=0, samples_per_shard=64)
    return out


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from cliplab.ray_connect import init_ray

    init_ray(None)
    yield
    ray.shutdown()


def _cfg(tmp_path: Path, corpus: Path, **overrides):
    from cliplab.config import ExperimentConfig, with_overrides

    return with_overrides(ExperimentConfig(), {
        "name": "gpu", "storage_path": str(tmp_path / "runs"), "data.train": str(corpus / "train"),
        "data.val": str(corpus / "val"), "data.batch_size": 32, "train.max_steps": 6, "train.checkpoint_every": 6,
        "train.num_workers": 1, "train.use_gpu": GPU, "train.gpus_per_worker": 1,
        "train.cpus_per_worker": 2 if GPU else 0.5, "tracking.uri": None, "eval.templates": ["a {}."], **overrides})


def test_cliplab_train_with_a_val_set_on_one_gpu_worker(tmp_path, corpus, local_ray):
    from cliplab.checkpoint import load_config
    from cliplab.train.launch import run_training

    result = run_training(_cfg(tmp_path, corpus), name="gpu-train")
    assert result.error is None
    assert result.metrics["step"] == 6 and result.metrics["val/num_samples"] > 0
    assert 0.0 <= result.metrics["val/image_to_text_R1"] <= 1.0
    assert load_config(Path(result.checkpoint.path)).train.use_gpu is GPU


def test_a_two_trial_sweep_with_fractional_gpus(tmp_path, corpus, local_ray):
    from ray import tune

    from cliplab.tune import NoScheduler, Sweep, run_sweep

    sweep = Sweep(base=_cfg(tmp_path, corpus, **{"train.gpus_per_worker": 0.5, "train.cpus_per_worker": 1 if GPU else 0.5}),
                  space={"optim.lr": tune.grid_search([1e-3, 2e-3])}, scheduler=NoScheduler(),
                  max_concurrent_trials=2, name="gpu-sweep")
    outcome = run_sweep(sweep, register=False)
    assert not outcome.errors
    assert [r["stop_reason"] for r in outcome.rows] == ["completed", "completed"]


def test_cliplab_eval_on_the_gpu(tmp_path, corpus, local_ray):
    from cliplab.eval.runner import run_eval
    from cliplab.train.launch import run_training

    result = run_training(_cfg(tmp_path, corpus, **{"train.max_steps": 2, "train.checkpoint_every": 2}),
                          name="gpu-eval")
    for use_ray, gpus in ((False, 0.0), (True, 0.5 if GPU else 0.0)):
        report = run_eval(result.checkpoint.path, [str(corpus / "val")], out_dir=tmp_path / f"eval-{use_ray}",
                          device="cuda" if GPU else "cpu", use_ray=use_ray, num_gpus=gpus, progress=False)
        metrics = report["datasets"][0]["metrics"]
        assert metrics["num_samples"] > 0 and 0.0 <= metrics["image_to_text_R1"] <= 1.0
