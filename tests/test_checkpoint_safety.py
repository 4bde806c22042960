"""Checkpoints from a bucket others can write: nothing in them runs code when cliplab loads them.

A ``trainer.pt`` (or ``model.pt``) carrying a pickle whose ``__reduce__`` runs a command is
refused with one clear line by every loader (`cliplab train --resume`, the workers' loader that a
restart runs, `cliplab eval --model`), and the command never runs.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import experiment

REPO = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this runs ``touch MARKER`` (what a pickle planted in the bucket would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save_tiny_checkpoint(path: Path):
    from cliplab.checkpoint import save_checkpoint
    from cliplab.config import ExperimentConfig
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective
    from cliplab.train.step import build_optimizer, cosine_with_warmup

    cfg = ExperimentConfig()
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    opt = build_optimizer(module, cfg.optim)
    save_checkpoint(path, module, opt, cosine_with_warmup(opt, 1, 10), step=3, epoch=0, cfg=cfg,
                    extra={"mlflow_run_id": "abc", "data_position": {"epoch": 0, "batches_done": 3,
                                                                      "positions": [48, 48], "skipped": {"x": 1}}})
    return module


def _plant(file: Path, marker: Path) -> None:
    """Replace ``file`` with a torch checkpoint whose unpickling runs code."""
    torch.save({"step": 3, "epoch": 0, "payload": _RunsCode(marker)}, file)


def test_trainer_state_is_tensors_and_plain_types_and_restores_every_rng(tmp_path):
    from cliplab.checkpoint import load_trainer_state, restore_rng

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state, which must survive too
    _save_tiny_checkpoint(tmp_path / "ckpt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    # loadable by the safe loader alone, with no allowlist
    state = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=True)
    assert state["step"] == 3 and state["data_position"]["positions"] == [48, 48]
    assert state["optimizer"]["param_groups"] and state["mlflow_run_id"] == "abc"
    for obj in (torch.load(tmp_path / "ckpt" / name, weights_only=True) for name in ("model.pt", "objective.pt")):
        assert all(isinstance(v, torch.Tensor) for v in obj.values())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_trainer_state(tmp_path / "ckpt"))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_checkpoint_from_before_the_plain_format_still_resumes(tmp_path):
    """The documented one-way path: an old trainer.pt (numpy's RNG state as a numpy array) loads
    with numpy's array constructors allowed and nothing else; the next checkpoint is plain."""
    from cliplab.checkpoint import load_trainer_state, restore_rng

    _save_tiny_checkpoint(tmp_path / "ckpt")
    old = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=True)
    np.random.seed(5)
    old["rng"]["numpy"] = np.random.get_state()  # the old format
    old["rng"]["python"] = random.getstate()
    expected = np.random.standard_normal(2).tolist()
    torch.save(old, tmp_path / "ckpt" / "trainer.pt")
    np.random.seed(0)
    restore_rng(load_trainer_state(tmp_path / "ckpt"))
    assert np.random.standard_normal(2).tolist() == expected


@pytest.mark.parametrize("name", ["trainer.pt", "model.pt", "objective.pt"])
def test_a_pickle_that_runs_code_is_refused_by_the_loaders_and_never_runs(tmp_path, name):
    from cliplab import checkpoint as ckpt

    module = _save_tiny_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    _plant(tmp_path / "ckpt" / name, marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=rf"ckpt/{name} holds objects that are not tensors or "
                                                         r"plain data \(posix.system\); refusing to unpickle it"):
        ckpt.load_trainer_state(tmp_path / "ckpt") if name == "trainer.pt" else ckpt.load_weights(tmp_path / "ckpt",
                                                                                                  module)
    assert not marker.exists()


def test_cliplab_eval_refuses_a_planted_model_pickle(tmp_path, emoji_corpus):
    _save_tiny_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    _plant(tmp_path / "ckpt" / "model.pt", marker)
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "eval", "--model", str(tmp_path / "ckpt"),
                           "--data", str(emoji_corpus[0] / "val"), "--local"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cliplab: error:")]
    assert len(lines) == 1 and "model.pt holds objects that are not tensors or plain data (posix.system)" in lines[0]
    assert "Traceback" not in proc.stderr and not marker.exists()


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_resume_and_restart_refuse_a_planted_trainer_state(tmp_path, s3_server, mlflow_server, ray_cluster):
    """`cliplab train --resume` refuses it in the driver, before any Ray work; the workers' loader
    (what a FailureConfig restart runs) refuses it too and ends the run without a restart."""
    from cliplab.checkpoint import latest_checkpoint
    from cliplab.errors import TrainingError
    from cliplab.train.launch import (
        build_datasets,
        build_trainer,
        preflight,
        raise_if_stopped,
        run_training,
        steps_per_epoch,
    )

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{"train.num_workers": 1, "train.max_steps": 2,
                                                            "train.checkpoint_every": 100, "train.max_failures": 2,
                                                            "train.eval_every_epoch": False})
    first = run_training(cfg, name="planted")
    assert first.error is None and first.metrics["step"] == 2
    latest = latest_checkpoint(Path(cfg.storage_path) / "planted")
    marker = tmp_path / "pwned"
    _plant(latest / "trainer.pt", marker)

    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "planted",
                           "--storage-path", cfg.storage_path, "--set", "train.max_steps=4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cliplab: error:")]
    assert len(lines) == 1 and "trainer.pt holds objects that are not tensors or plain data (posix.system)" \
        in lines[0], proc.stderr[-3000:]
    assert not marker.exists()

    # the workers' loader: the same TorchTrainer a restart resumes (Ray Train picks the run's checkpoint up)
    prep = preflight(cfg)
    trainer = build_trainer(prep, name="planted", datasets=build_datasets(prep),
                            steps=steps_per_epoch(cfg))
    result = trainer.fit()
    with pytest.raises(TrainingError, match=r"stopped at step 0, without a restart: .*trainer.pt holds objects that "
                                            r"are not tensors or plain data \(posix.system\)") as stopped:
        raise_if_stopped(result, "planted", cfg)
    assert "\n" not in str(stopped.value) and not marker.exists()
