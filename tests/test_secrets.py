"""Secrets past the MLflow redactor: checkpoint config.json, registered models, `cliplab submit`'s
runtime env and entrypoint (Ray's job table), and the job driver's logs. Planted secrets are looked
for everywhere a run leaves text; the end-to-end test submits a real job to a local Ray head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLIPLAB = str(VENV_BIN / "cliplab")
CONFIG = "cluster/experiments/emoji_clip.yaml"
URI_PASSWORD = "planted-uri-pw-4e1d"
SHELL_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY0042",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-c0ffee",
    "AWS_SESSION_TOKEN": "planted-session-token-9a9a",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-77b1",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-3c3c",
    "HF_TOKEN": "hf_plantedhubtoken55",
}

if str(VENV_BIN) not in os.environ.get("PATH", "").split(os.pathsep)[:1]:
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def _leaks(text: str, secrets) -> list[str]:
    return [s for s in secrets if s in text]


def _scan_folder(folder: Path, secrets) -> list[tuple[str, str]]:
    """(file, secret) for every planted secret in any file under ``folder`` (bytes, so pickles too)."""
    return [(str(p.relative_to(folder)), s) for p in folder.rglob("*") if p.is_file()
            for s in secrets if s.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------------- cliplab submit

def test_submit_keeps_secret_values_out_of_the_job(monkeypatch):
    from cliplab.jobspec import build_job

    for k, v in SHELL_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://cliplab:{URI_PASSWORD}@mlflow:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://seaweed:8333")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "cliplab")
    job = build_job(REPO / CONFIG, working_dir=REPO, overrides=["train.max_steps=3"])
    sent = job.entrypoint + json.dumps(job.runtime_env)
    assert _leaks(sent, [*SHELL_SECRETS.values(), URI_PASSWORD]) == []
    assert job.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://seaweed:8333"  # settings still travel
    assert job.runtime_env["env_vars"]["MLFLOW_TRACKING_USERNAME"] == "cliplab"
    assert job.withheld == sorted(["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"])
    assert job.secrets == []

    forced = build_job(REPO / CONFIG, working_dir=REPO, forward_secrets=True)
    assert forced.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SHELL_SECRETS["AWS_SECRET_ACCESS_KEY"]
    assert "AWS_SESSION_TOKEN" in forced.secrets and "MLFLOW_TRACKING_URI" in forced.secrets


@pytest.mark.parametrize("how", ["env", "set", "runtime-env-file"])
def test_a_secret_given_explicitly_is_refused_without_the_flag(how, monkeypatch, tmp_path):
    from cliplab.errors import ConfigError
    from cliplab.jobspec import build_job

    for k, v in SHELL_SECRETS.items():
        monkeypatch.setenv(k, v)
    kwargs: dict = {}
    if how == "env":
        kwargs["env"] = ["HF_TOKEN"]
    elif how == "set":
        kwargs["overrides"] = [f"tracking.uri=http://u:{URI_PASSWORD}@mlflow:5000"]
    else:
        env_file = tmp_path / "runtime_env.yaml"
        env_file.write_text(f"env_vars:\n  HF_HUB_OFFLINE: '1'\n  HF_TOKEN: {SHELL_SECRETS['HF_TOKEN']}\n")
        kwargs["runtime_env_file"] = env_file
    with pytest.raises(ConfigError) as err:
        build_job(REPO / CONFIG, working_dir=REPO, **kwargs)
    message = str(err.value)
    assert "holds a secret" in message and "--forward-secrets" in message and "`ray job list`" in message
    assert _leaks(message, [*SHELL_SECRETS.values(), URI_PASSWORD]) == []
    job = build_job(REPO / CONFIG, working_dir=REPO, forward_secrets=True, **kwargs)
    assert job.secrets  # allowed with the flag, and named for the warning


# ---------------------------------------------------------------------------------- checkpoints and models

def _download_model(model_uri: str, dest: Path, tracking_uri: str) -> Path:
    """Every file of a registered model version, with its checkpoint's config.json among them."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    configs = list(local.rglob("checkpoint/config.json"))
    assert len(configs) == 1, sorted(str(p.relative_to(local)) for p in local.rglob("*"))
    return local


def _tiny_checkpoint(path: Path, cfg):
    import torch

    from cliplab.checkpoint import save_checkpoint
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective
    from cliplab.train.step import build_optimizer, cosine_with_warmup

    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    optimizer = build_optimizer(module, cfg.optim)
    return save_checkpoint(path, module, optimizer, cosine_with_warmup(optimizer, 1, 10), step=1, epoch=0, cfg=cfg)


def _secret_config(uri: str):
    from cliplab.config import ExperimentConfig, with_overrides

    with_pw = uri.replace("http://", f"http://cliplab:{URI_PASSWORD}@")
    return with_overrides(ExperimentConfig(), {
        "name": f"run-{SHELL_SECRETS['HF_TOKEN']}", "tracking.uri": with_pw,
        "data.train": f"s3://cliplab/x/?X-Amz-Signature={SHELL_SECRETS['AWS_SESSION_TOKEN']}"})


def test_checkpoint_config_json_is_redacted_and_resume_asks_for_the_secret(monkeypatch, tmp_path):
    from cliplab.checkpoint import load_config

    for k, v in SHELL_SECRETS.items():
        monkeypatch.setenv(k, v)
    ckpt = _tiny_checkpoint(tmp_path / "runs" / "secret-run" / "checkpoint_000001",
                            _secret_config("http://127.0.0.1:5000"))
    assert _scan_folder(ckpt, [*SHELL_SECRETS.values(), URI_PASSWORD]) == []
    cfg = load_config(ckpt)  # still a loadable config: the masked strings are just strings
    assert cfg.tracking.uri == "http://cliplab:***@127.0.0.1:5000"

    out = subprocess.run([CLIPLAB, "train", "--resume", "secret-run", "--storage-path", str(tmp_path / "runs"),
                          "--dry-run"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "has secrets masked in name, data.train, tracking.uri: give them again (--set name=...)" in lines[0]


@pytest.mark.mlflow
def test_a_registered_model_carries_no_secret(monkeypatch, tmp_path, mlflow_server):
    """A checkpoint written before config.json was redacted (its config carries the password) is
    registered: every file of the model version, and the version's tags, are clean."""
    import mlflow
    from mlflow import MlflowClient

    from cliplab.config import to_dict
    from cliplab.tracking.registry import register_checkpoint

    for k, v in SHELL_SECRETS.items():
        monkeypatch.setenv(k, v)
    cfg = _secret_config(mlflow_server.uri)
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", cfg)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))  # as an older cliplab wrote it
    name = f"secrets-{uuid.uuid4().hex[:6]}"
    info = register_checkpoint(str(ckpt), name, "champion", uri=mlflow_server.uri,
                               version_tags={"source": cfg.tracking.uri})
    local = _download_model(f"models:/{name}/{info['version']}", tmp_path / "model", mlflow_server.uri)
    secrets = [*SHELL_SECRETS.values(), URI_PASSWORD]
    assert _scan_folder(local, secrets) == []
    run_files = Path(mlflow.artifacts.download_artifacts(run_id=info["run_id"], dst_path=str(tmp_path / "run"),
                                                         tracking_uri=mlflow_server.uri))
    assert _scan_folder(run_files, secrets) == []  # the open_clip export
    version = MlflowClient(mlflow_server.uri).get_model_version(name, str(info["version"]))
    assert _leaks(json.dumps(version.tags) + str(version.source), secrets) == [], version.tags


# ---------------------------------------------------------------------------------- end to end on Ray

@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
@pytest.mark.slow
def test_a_submitted_job_leaves_no_secret_in_ray_checkpoints_models_or_logs(tmp_path, s3_server, mlflow_server,
                                                                           ray_cluster):
    """The submitting shell holds planted secrets and the experiment file a tracking URI with a
    password; the cluster (the Ray head's environment) holds the S3 keys, as a Kubernetes Secret
    would. The job trains; then Ray's job info, the driver's raw log, the checkpoints, the MLflow
    run and a model registered from the job's checkpoint are scanned."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from cliplab.checkpoint import latest_checkpoint
    from cliplab.submit import _headers
    from cliplab.tracking.registry import register_checkpoint

    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    job_id = f"cliplab-secrets-{uuid.uuid4().hex[:8]}"
    wd = tmp_path / "wd"
    wd.mkdir()
    exp = yaml.safe_load((REPO / CONFIG).read_text())
    exp.setdefault("tracking", {})["uri"] = mlflow_server.uri.replace("http://", f"http://cliplab:{URI_PASSWORD}@")
    (wd / "exp.yaml").write_text(yaml.safe_dump(exp))
    storage = tmp_path / "runs"
    sets = {"storage_path": str(storage), "data.train": "s3://cliplab/emoji/train/", "data.val": "s3://cliplab/emoji/val/",
            "data.s3.endpoint_url": s3_server.endpoint, "data.batch_size": 16, "train.use_gpu": "false",
            "train.num_workers": 1, "train.cpus_per_worker": 0.5, "train.max_steps": 2, "train.log_every": 1,
            "train.checkpoint_every": 2, "train.eval_every_epoch": "false", "tracking.experiment": experiment,
            "tracking.system_metrics": "false", "eval.templates": '["an emoji of {}."]'}
    cmd = [CLIPLAB, "submit", "exp.yaml", "--working-dir", str(wd), "--address", ray_cluster.dashboard_url,
           "--job-id", job_id]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    shell = {**os.environ, **SHELL_SECRETS, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    out = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=420, env=shell)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"job {job_id} SUCCEEDED" in out.stdout
    assert "not forwarded (secrets; the cluster provides them): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out.stdout
    assert "--forward-secrets" not in out.stderr  # no warning: nothing was forwarded

    secrets = [*SHELL_SECRETS.values(), URI_PASSWORD, s3_server.secret_key]
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers=_headers())
    info = client.get_job_info(job_id)
    listed = [j for j in client.list_jobs() if j.submission_id == job_id]
    ray_view = json.dumps(info.dict(), default=str) + json.dumps([j.dict() for j in listed], default=str)
    assert "exp.yaml" in info.entrypoint
    assert _leaks(ray_view, secrets) == [], "a secret is in Ray's job table"
    driver_log = client.get_job_logs(job_id)  # raw, as `ray job logs` shows it
    assert "final metrics:" in driver_log
    leaked = [line[:400] for line in (driver_log + out.stdout + out.stderr).splitlines() if _leaks(line, secrets)]
    assert leaked == [], "a secret is in the driver's logs"

    run_dirs = {m.parent.parent for m in storage.rglob("checkpoint_*/COMPLETE")}
    assert len(run_dirs) == 1, run_dirs
    ckpt = latest_checkpoint(run_dirs.pop())
    assert ckpt is not None and (ckpt / "config.json").is_file()
    assert _scan_folder(storage, secrets) == [], "a secret is in the run's storage (checkpoints)"
    assert json.loads((ckpt / "config.json").read_text())["tracking"]["uri"].startswith("http://cliplab:***@")

    mlflow_client = MlflowClient(mlflow_server.uri)
    run = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(experiment).experiment_id])[0]
    logged = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
    arts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "run-arts"),
                                                    tracking_uri=mlflow_server.uri))
    assert _leaks(logged, secrets) == [] and _scan_folder(arts, secrets) == []

    reg = register_checkpoint(str(ckpt), f"secrets-e2e-{uuid.uuid4().hex[:6]}", "champion", uri=mlflow_server.uri)
    model = _download_model(reg["model_uri"], tmp_path / "model", mlflow_server.uri)
    assert _scan_folder(model, secrets) == [], "a secret is in the registered model"
