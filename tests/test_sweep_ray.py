"""A 2-trial Ray Tune sweep that registers its best model, loadable as models:/NAME@champion."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray import tune

from conftest import experiment

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow, pytest.mark.slow]

LOAD = """
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/cliplab-demo@champion")
out = model.predict(pd.DataFrame({"text": ["red apple", "grinning face"]}))
print(json.dumps(out["text_embedding"].tolist()))
"""


def test_two_trial_sweep_registers_a_loadable_champion(tmp_path, s3_server, mlflow_server, ray_cluster):
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective
    from cliplab.train.checkpoint import load_config, load_weights
    from cliplab.tune import Sweep, run_sweep

    base = experiment(tmp_path, s3_server, mlflow_server, **{"train.max_steps": 3})
    sweep = Sweep(base=base, space={"objective.temperature": tune.grid_search([0.07, 0.05])},
                  register_as="cliplab-demo", name="test-sweep")
    outcome = run_sweep(sweep)
    assert not outcome.errors
    assert sorted(r["objective.temperature"] for r in outcome.rows) == [0.05, 0.07]
    best = max(outcome.rows, key=lambda r: r["val/image_to_text_R1"])
    assert outcome.best["val/image_to_text_R1"] == best["val/image_to_text_R1"]

    reg = outcome.registered
    client = MlflowClient(mlflow_server.uri)
    version = client.get_model_version_by_alias("cliplab-demo", "champion")
    assert int(version.version) == reg["version"]
    assert version.run_id == outcome.best["mlflow_run_id"]  # logged into the best trial's run

    # a fresh process loads the alias and gets the checkpoint's embeddings
    proc = subprocess.run([sys.executable, "-c", LOAD, mlflow_server.uri], capture_output=True, text=True,
                          timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))

    ckpt = Path(outcome.best["checkpoint_path"])
    cfg = load_config(ckpt)
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective))
    load_weights(ckpt, module)
    module.eval()
    with torch.no_grad():
        expected = module.objective.embed(
            module.model.encode_text(bundle.tokenizer(["red apple", "grinning face"]), normalize=False))
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=1e-5)
