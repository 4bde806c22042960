"""The parity settings of issue 20 through a real 2-worker Ray Train run (gloo DDP, S3 shards,
MLflow): fp16 with its gradient scaler, a locked image tower, const-cooldown, then a resume with a
longer budget whose learning rate never rises."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import experiment

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow, pytest.mark.slow]


def test_fp16_a_locked_image_tower_and_a_const_run_resumed_into_a_cooldown(tmp_path, s3_server, mlflow_server,
                                                                          ray_cluster):
    from cliplab.checkpoint import load_trainer_state
    from cliplab.config import with_overrides
    from cliplab.train.launch import run_training

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.precision": "fp16", "model.lock_image": True, "optim.schedule": "const", "optim.warmup_steps": 1,
        "train.epochs": 10, "train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every_epoch": False,
        "tracking.run_name": "parity"})
    first = run_training(cfg, name="parity")
    assert first.error is None and first.metrics["step"] == 4
    final = Path(first.checkpoint.path)
    state = load_trainer_state(final)
    assert state["scaler"]["scale"] > 0
    frozen = set(state["frozen"]) - {"model.logit_scale"}  # open_clip's own scale is never trained: the objective's is
    assert frozen and all(name.startswith("model.visual.") for name in frozen)  # the image tower, and only it
    weights = torch.load(final / "model.pt", weights_only=True)
    earliest = sorted((Path(cfg.storage_path) / "parity").glob("checkpoint_*"))[0]
    assert earliest != final and load_trainer_state(earliest)["step"] == 2
    early = torch.load(earliest / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], early[k]) for k in weights if k.startswith("visual."))
    assert any(not torch.equal(weights[k], early[k]) for k in weights if k.startswith("transformer."))

    # open_clip's recipe: cool a constant run down from its checkpoint, over a longer budget
    cooldown = with_overrides(cfg, {"optim.schedule": "const-cooldown", "optim.cooldown_steps": 2,
                                    "train.max_steps": 8})
    second = run_training(cooldown, name="parity")
    assert second.error is None and second.metrics["step"] == 8
    schedule = load_trainer_state(Path(second.checkpoint.path))["scheduler"]["lr_lambdas"][0]
    assert (schedule["kind"], schedule["total"], schedule["from_step"]) == ("const-cooldown", 8, None)
    history = MlflowClient(mlflow_server.uri).get_metric_history(second.metrics["mlflow_run_id"], "train/lr")
    lrs = {m.step: m.value for m in history}  # the lr after each step, i.e. the next step's
    lr = cfg.optim.lr
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([lr] * 6 + [lr / 2, 0.0], rel=1e-9, abs=1e-15)
