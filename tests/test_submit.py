"""``cliplab submit`` / ``cliplab jobs`` and plain ``ray job submit`` against a real local Ray head
(token auth), training a few steps from the S3 fixture and logging to the MLflow fixture.

The job runs ``cliplab train cluster/experiments/emoji_clip.yaml`` in the uploaded working dir (the
repo minus .venv, .git, .cliplab, data...), on the head's machine: the ``cliplab`` console script is
found on the PATH the head was started with, so the venv's bin/ goes first on PATH when this module
is collected (before any session fixture starts Ray).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLIPLAB = str(VENV_BIN / "cliplab")
CONFIG = "cluster/experiments/emoji_clip.yaml"

if str(VENV_BIN) not in os.environ.get("PATH", "").split(os.pathsep)[:1]:
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

def _overrides(tmp_path: Path, s3_server, mlflow_server, experiment: str) -> list[str]:
    """The cluster experiment made tiny and pointed at the test services (no files written)."""
    values = {
        "storage_path": str(tmp_path / "runs"),  # one machine: a local path is shared storage
        "data.train": "s3://cliplab/emoji/train/",
        "data.val": "s3://cliplab/emoji/val/",
        "data.s3.endpoint_url": s3_server.endpoint,
        "data.batch_size": 16,
        "train.use_gpu": "false",
        "train.num_workers": 1,  # submission is under test here, not DDP (test_train_ray covers 2 workers)
        "train.cpus_per_worker": 0.5,
        "train.max_steps": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        "train.eval_every_epoch": "false",
        "tracking.uri": mlflow_server.uri,
        "tracking.experiment": experiment,
        "tracking.system_metrics": "false",
        "eval.templates": '["an emoji of {}."]',
    }
    return [f"{k}={v}" for k, v in values.items()]


def _run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def _assert_trained(mlflow_server, experiment: str, steps: int = 3) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, steps + 1))
    assert run.data.params["train.max_steps"] == str(steps)
    assert run.data.params.get("git.sha", "unknown") != ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_one_clear_line_within_seconds():
    address = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    out = _run([CLIPLAB, "submit", CONFIG, "--address", address], timeout=30)
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert elapsed < 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("cliplab: error:") and address in lines[0]

    out = _run([CLIPLAB, "jobs", "list", "--address", address], timeout=30)
    assert out.returncode == 2 and address in out.stderr and "Traceback" not in out.stderr


def test_file_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "exp.yaml"
    outside.write_text("name: x\n")
    out = _run([CLIPLAB, "submit", str(outside), "--address", "http://127.0.0.1:1"], timeout=30)
    assert out.returncode == 2 and "outside the working dir" in out.stderr


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_cliplab_submit_trains_and_jobs_lists_it(tmp_path, s3_server, mlflow_server, ray_cluster):
    experiment = f"submit-{uuid.uuid4().hex[:8]}"
    job_id = f"cliplab-test-{uuid.uuid4().hex[:8]}"
    address = ray_cluster.dashboard_url
    cmd = [CLIPLAB, "submit", CONFIG, "--address", address, "--job-id", job_id]
    for item in _overrides(tmp_path, s3_server, mlflow_server, experiment):
        cmd += ["--set", item]
    out = _run(cmd, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"job {job_id} SUCCEEDED" in out.stdout
    assert "final metrics:" in out.stdout  # the job's own output, streamed
    assert "forwarded from this shell: AWS_ENDPOINT_URL" in out.stdout  # settings travel, secrets do not:
    assert "not forwarded (secrets; the cluster provides them): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out.stdout
    assert s3_server.secret_key not in out.stdout + out.stderr  # names only, never values
    _assert_trained(mlflow_server, experiment)

    listed = _run([CLIPLAB, "jobs", "list", "--address", address], timeout=60)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and "cliplab train" in row
    assert s3_server.secret_key not in listed.stdout

    logs = _run([CLIPLAB, "jobs", "logs", job_id, "--address", address], timeout=60)
    assert logs.returncode == 0 and "final metrics:" in logs.stdout

    # a cluster with token auth and a client without a token: a clear line, not a traceback
    denied = _run([CLIPLAB, "jobs", "list", "--address", address], timeout=60, RAY_AUTH_MODE="disabled")
    assert denied.returncode == 2 and "requires a token" in denied.stderr and "Traceback" not in denied.stderr


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_plain_ray_job_submit_runs_cliplab_train(tmp_path, s3_server, mlflow_server, ray_cluster):
    experiment = f"ray-submit-{uuid.uuid4().hex[:8]}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".",
           "--runtime-env", "cluster/runtime_env.yaml", "--", "cliplab", "train", CONFIG]
    for item in _overrides(tmp_path, s3_server, mlflow_server, experiment):
        cmd += ["--set", item]
    out = _run(cmd, timeout=420, RAY_AUTH_MODE="token")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in (out.stdout + out.stderr).lower()
    _assert_trained(mlflow_server, experiment)


@pytest.mark.ray
@pytest.mark.slow
def test_no_wait_then_jobs_logs_follow_and_stop_on_a_failing_job(tmp_path, ray_cluster):
    """A job that fails in preflight (no such shards): --no-wait returns at once with the id, logs
    --follow reports the failure with exit 1, stop says it is no longer running."""
    address = ray_cluster.dashboard_url
    job_id = f"cliplab-fail-{uuid.uuid4().hex[:8]}"
    out = _run([CLIPLAB, "submit", CONFIG, "--address", address, "--job-id", job_id, "--no-wait",
                "--set", "data.train=/nonexistent/shards/", "--set", "data.val=null",
                "--set", f"storage_path={tmp_path / 'runs'}"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == job_id

    logs = _run([CLIPLAB, "jobs", "logs", job_id, "--follow", "--address", address], timeout=180)
    assert logs.returncode == 1
    assert "/nonexistent/shards" in logs.stdout and f"job {job_id} FAILED" in logs.stderr

    stop = _run([CLIPLAB, "jobs", "stop", job_id, "--address", address], timeout=60)
    assert stop.returncode == 0 and "not running" in stop.stdout
