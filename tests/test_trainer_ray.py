"""The trainer on a real Ray cluster: a worker SIGKILLed mid-run, and `cliplab train --resume`."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import experiment
from netfaults import CuttingProxy

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_a_killed_worker_is_replaced_and_the_run_ends_at_the_exact_step(tmp_path, s3_server, mlflow_server,
                                                                         ray_cluster, emoji_corpus):
    """Also the data side of a crash: the run trains on each sample of the interrupted epoch exactly
    once, in plan order, and the batches redone after the restart are the same samples."""
    from cliplab.train.launch import run_training, steps_per_epoch
    from test_data_ray import plan_keys

    steps, every = 24, 5
    record = tmp_path / "keys"
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "train.max_steps": steps, "train.epochs": 4, "train.checkpoint_every": every,
        "train.eval_every_epoch": False, "train.max_failures": 2, "tracking.run_name": "fault-run",
        "data.record_keys": str(record)})
    killed: dict = {}
    client = MlflowClient(mlflow_server.uri)

    snapshot = Path(cfg.storage_path) / "fault" / "checkpoint_manager_snapshot.json"

    def killer():
        """SIGKILL one worker after Ray Train registered the first checkpoint (step 5) and training went on."""
        deadline = time.monotonic() + 300
        exp = None
        while time.monotonic() < deadline:
            exp = exp or client.get_experiment_by_name(cfg.tracking.experiment)
            runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'fault-run'") if exp else []
            logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []
            registered = snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text()
            if registered and logged and max(logged) >= every + 1:
                pids = _train_worker_pids()
                if pids:
                    killed.update(pid=pids[-1], at_step=max(logged))
                    os.kill(pids[-1], signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg, name="fault")
    thread.join(timeout=30)
    assert "pid" in killed, "the run ended before a worker could be killed"
    assert result.error is None and result.metrics["step"] == steps

    history = client.get_metric_history(result.metrics["mlflow_run_id"], "train/loss")
    seen = Counter(m.step for m in history)
    assert sorted(seen) == list(range(1, steps + 1))  # one MLflow run, continued after the restart
    # the worker group was restarted from a checkpoint (step 5 or later), not from step 0 ...
    resumed = [int(m.value) for m in client.get_metric_history(result.metrics["mlflow_run_id"],
                                                               "train/resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] >= every and resumed[0] % every == 0, resumed
    # ... and redid at most one checkpoint interval (0 if the kill landed right after a checkpoint)
    redone = sum(c - 1 for c in seen.values())
    assert redone <= every, f"{redone} steps redone after a kill at step {killed['at_step']}"
    assert client.get_run(result.metrics["mlflow_run_id"]).info.status == "FINISHED"

    # data: per rank, the last copy of each (epoch, batch) is what the run trained on
    per_epoch, size = steps_per_epoch(cfg), cfg.data.batch_size
    for rank in (0, 1):
        batches, replays = _recorded_batches(record / f"rank{rank}.tsv", size)
        assert sorted(batches) == [(e, b) for e in range(3) for b in range(1, per_epoch + 1)
                                   if e * per_epoch + b <= steps]
        for e in range(3):
            trained = [k for (ep, b), keys in sorted(batches.items()) if ep == e for k in keys]
            expected = plan_keys(cfg, s3_server, emoji_corpus, epoch=e, world=2, rank=rank)
            assert trained == expected[:len(trained)]  # every sample once, in plan order: no duplicate, no miss
            assert len(trained) == min(per_epoch, steps - e * per_epoch) * size
        # the restarted workers redid the steps after the checkpoint (plus, at most, the one the kill
        # cut short before it was logged) with the same samples
        assert redone <= len(replays) <= every + 1
        assert all(first == batches[key] for key, first in replays)


def _recorded_batches(path: Path, size: int) -> tuple[dict, list]:
    """``{(epoch, batch): keys}`` (the last copy of each batch) and ``[((epoch, batch), keys)]`` of
    the earlier copies that a restart replaced, from a ``data.record_keys`` file. A line torn by
    the SIGKILL is dropped, and so is a batch left incomplete by it."""
    copies: list = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        key = (int(parts[0]), int(parts[1]))
        if copies and copies[-1][0] == key and len(copies[-1][1]) < size:
            copies[-1][1].append(parts[2])
        else:
            copies.append((key, [parts[2]]))
    latest, replays = {}, []
    for key, keys in copies:
        if key in latest and len(latest[key]) == size:
            replays.append((key, latest[key]))
        latest[key] = keys
    return latest, replays


def test_cliplab_train_resume_continues_a_stopped_run(tmp_path, s3_server, mlflow_server, ray_cluster):
    from cliplab.checkpoint import latest_checkpoint, load_trainer_state
    from cliplab.train.launch import run_training

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{"train.max_steps": 3, "train.checkpoint_every": 100,
                                                            "train.eval_every_epoch": False})
    first = run_training(cfg, name="resumable")
    assert first.error is None and first.metrics["step"] == 3
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "resumable",
                           "--storage-path", cfg.storage_path, "--set", "train.max_steps=6"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming run resumable" in proc.stdout
    final = latest_checkpoint(Path(cfg.storage_path) / "resumable")
    assert load_trainer_state(final)["step"] == 6
    history = MlflowClient(mlflow_server.uri).get_metric_history(first.metrics["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # the same MLflow run goes on

    missing = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "no-such-run",
                              "--storage-path", cfg.storage_path], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no complete checkpoint under" in missing.stderr


def test_checkpoints_on_s3_keep_top_k_resume_and_register(tmp_path, s3_server, mlflow_server, ray_cluster):
    """storage_path=s3://… (the KubeRay manifests' default): checkpoints land in the bucket with
    every file and only the newest k kept, `cliplab train --resume` continues from S3, and the
    registry loads the S3 checkpoint's weights."""
    import mlflow
    import pandas as pd
    import torch

    from cliplab.checkpoint import MARKER, fetch_checkpoint, latest_in_storage, load_trainer_state
    from cliplab.eval.loading import load_model
    from cliplab.tracking.registry import register_checkpoint
    from cliplab.train.launch import run_training

    cfg = experiment(tmp_path, s3_server, mlflow_server, storage_path="s3://cliplab/runs",
                     **{"train.num_workers": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
                        "train.keep_checkpoints": 1, "train.eval_every_epoch": False})
    first = run_training(cfg, name="on-s3")
    assert first.error is None and first.metrics["step"] == 4
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="cliplab", Prefix="runs/on-s3/")["Contents"]]
    folders = sorted({k.split("/")[2] for k in keys if k.count("/") > 2 and k.split("/")[2].startswith("checkpoint_")})
    assert len(folders) == 1, folders  # the step-2 checkpoint was dropped (keep_checkpoints=1)
    for name in ("model.pt", "objective.pt", "trainer.pt", "config.json", MARKER):
        assert f"runs/on-s3/{folders[0]}/{name}" in keys

    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "on-s3",
                           "--storage-path", "s3://cliplab/runs", "--set", "train.max_steps=6"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    filesystem, path = latest_in_storage("s3://cliplab/runs/on-s3")
    local = fetch_checkpoint(path, tmp_path / "fetched", filesystem)
    assert load_trainer_state(local)["step"] == 6
    history = MlflowClient(mlflow_server.uri).get_metric_history(first.metrics["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]

    register_checkpoint(path, "s3-storage-test", "champion", uri=mlflow_server.uri, filesystem=filesystem)
    mlflow.set_tracking_uri(mlflow_server.uri)
    served = mlflow.pyfunc.load_model("models:/s3-storage-test@champion", dst_path=str(tmp_path)) \
        .predict(pd.DataFrame({"text": ["red apple"]}))
    loaded = load_model("s3://cliplab/runs/on-s3")  # cliplab eval --model: the run's latest checkpoint on S3
    with torch.no_grad():
        expected = loaded.objective.embed(loaded.encode_texts(["red apple"]), "text")
    torch.testing.assert_close(torch.tensor(served["text_embedding"].tolist()), expected, rtol=0, atol=1e-6)

    missing = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "no-such-run",
                              "--storage-path", "s3://cliplab/runs"], cwd=REPO, capture_output=True, text=True,
                             timeout=60, env=os.environ.copy())
    assert missing.returncode == 2 and "no complete checkpoint under s3://cliplab/runs/no-such-run" in missing.stderr
    wrong = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "train", "--resume", "on-s3", "--storage-path",
                            "s3://cliplab/runs"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})  # a listing's error
    assert wrong.returncode == 2 and "S3 rejected the credentials for s3://cliplab/runs/on-s3" in wrong.stderr, \
        wrong.stderr[-2000:]
    assert "Traceback" not in wrong.stderr


def test_a_checkpoint_upload_cut_off_fails_the_run_instead_of_losing_the_checkpoint(tmp_path, s3_server, mlflow_server,
                                                                                    ray_cluster):
    """Ray's default checkpoint upload (pyarrow's copy_files) only logs a failed S3 part upload,
    so the run 'succeeded' without its checkpoint. With the trainer's upload, the worker fails."""
    from cliplab.checkpoint import latest_in_storage
    from cliplab.errors import TrainingError
    from cliplab.train.launch import run_training

    with CuttingProxy(s3_server.port, rb"PUT /cliplab/runs/cut-off/checkpoint_[^/ ]+/model\.pt") as proxy:
        cfg = experiment(tmp_path, s3_server, mlflow_server, storage_path="s3://cliplab/runs",
                         **{"data.s3.endpoint_url": proxy.endpoint, "train.num_workers": 1, "train.max_steps": 2,
                            "train.checkpoint_every": 2, "train.max_failures": 0, "train.eval_every_epoch": False})
        with pytest.raises(TrainingError) as failed:
            run_training(cfg, name="cut-off")
    message = str(failed.value)
    assert proxy.cuts >= 1 and "\n" not in message, message
    assert re.search(r"rank 0: OSError: When uploading part for key 'runs/cut-off/checkpoint_[^/]+/model.pt'.*"
                     r"Empty reply from server", message), message
    assert "cliplab train --resume cut-off --storage-path s3://cliplab/runs" in message
    assert latest_in_storage("s3://cliplab/runs/cut-off") is None  # no checkpoint passes for complete
