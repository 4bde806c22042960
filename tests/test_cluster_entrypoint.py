"""The RayJobs' entrypoint guard (cluster/resume_or_start.py) and the MLflow image's entrypoint
(cluster/mlflow-entrypoint.sh): issue 15 items 4 and 6. Local storage stands in for S3 (the guard
reads both through the same pyarrow filesystem code)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


@pytest.fixture
def guard(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("resume_or_start", CLUSTER / "resume_or_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job_env(submission_id: str) -> dict[str, str]:
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}, "metadata": {
        "job_submission_id": submission_id, "job_name": submission_id}})}


def test_the_run_id_is_the_rayjobs_name(guard):
    # KubeRay: "<RayJob name>-<5 random characters>", a new suffix for every retry
    assert guard.run_id(_job_env("cliplab-sweep-cloob-x7k2p-bq4zd")) == "cliplab-sweep-cloob-x7k2p"
    assert guard.run_id(_job_env("cliplab-sweep-cloob-x7k2p-9fw2c")) == "cliplab-sweep-cloob-x7k2p"
    # `ray job submit`: its id whole, so a new submission never resumes an old one
    assert guard.run_id(_job_env("raysubmit_AbCdEf123")) == "raysubmit_AbCdEf123"
    assert guard.run_id({**_job_env("x-bq4zd"), "CLIPLAB_RUN_ID": "mine"}) == "mine"
    with pytest.raises(SystemExit, match="CLIPLAB_RUN_ID"):
        guard.run_id({})


def test_a_sweep_starts_then_resumes(guard, tmp_path):
    env = _job_env("cliplab-sweep-cloob-x7k2p-bq4zd")
    argv = ["sweep", "sweeps/cloob_beta_tau.py", "--set", f"storage_path={tmp_path}"]
    command, why = guard.decide(argv, env)
    assert command == [*argv, "--set", f"storage_path={tmp_path}/cliplab-sweep-cloob-x7k2p"]
    assert "starting" in why
    # what Tune leaves after a sweep's first attempt: its pickled Tuner beside the experiment state
    state = tmp_path / "cliplab-sweep-cloob-x7k2p" / "cloob_beta_tau"
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"")  # Tuner.can_restore looks for it
    command, why = guard.decide(argv, _job_env("cliplab-sweep-cloob-x7k2p-9fw2c"))  # the retry
    assert command[-1] == "--resume" and "resuming" in why
    # another RayJob of the same sweep starts its own
    command, _ = guard.decide(argv, _job_env("cliplab-sweep-cloob-q4m9z-bq4zd"))
    assert "--resume" not in command and command[-1].endswith("/cliplab-sweep-cloob-q4m9z")


def test_the_resumed_sweep_command_parses(guard, tmp_path):
    from cliplab.cli.main import build_parser

    env = _job_env("cliplab-sweep-cloob-x7k2p-bq4zd")
    state = tmp_path / "cliplab-sweep-cloob-x7k2p" / "cloob_beta_tau"
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"")  # Tuner.can_restore looks for it
    command, _ = guard.decide(["sweep", "sweeps/cloob_beta_tau.py", "--set", f"storage_path={tmp_path}"], env)
    args = build_parser().parse_args(command)
    assert args.resume is True and args.overrides[-1] == f"storage_path={tmp_path}/cliplab-sweep-cloob-x7k2p"


def test_a_training_run_starts_then_resumes(guard, tmp_path):
    from cliplab.cli.main import build_parser

    env = _job_env("cliplab-train-x7k2p-bq4zd")
    argv = ["train", "cluster/experiments/emoji_clip.yaml", "--set", f"storage_path={tmp_path}"]
    command, why = guard.decide(argv, env)
    assert command == [*argv, "--name", "cliplab-train-x7k2p"] and "starting" in why
    # a torn checkpoint (no COMPLETE marker) is not a reason to resume
    ckpt = tmp_path / "cliplab-train-x7k2p" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    assert "--name" in guard.decide(argv, env)[0]
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 100}))
    command, why = guard.decide(argv, env)
    assert command == [*argv, "--resume", "cliplab-train-x7k2p"] and "resuming" in why
    args = build_parser().parse_args(command)
    assert args.resume == "cliplab-train-x7k2p" and args.config == "cluster/experiments/emoji_clip.yaml"


def test_the_guard_refuses_resume_and_name_of_its_own(guard):
    with pytest.raises(SystemExit, match="leave --resume"):
        guard.decide(["sweep", "sweeps/cloob_beta_tau.py", "--resume"], _job_env("a-bq4zd"))


def test_mlflow_entrypoint_writes_the_auth_config(tmp_path):
    """The auth app's database is the backend store; a URL-encoded password ('%') survives
    configparser's interpolation; the admin comes from the environment (mlflow reads it itself)."""
    # mlflow.server.auth's package needs Flask-WTF (the image has it, the test env need not): load the
    # config module on its own
    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    read_auth_config = auth_config.read_auth_config

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mlflow").write_text('#!/bin/sh\necho "$@" > "$OUT"\n')
    (fake / "mlflow").chmod(0o755)
    ini = tmp_path / "auth" / "basic_auth.ini"
    uri = "postgresql://mlflow:p%40ss%25word@db.example.internal:5432/mlflow"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / "args"), "MLFLOW_BACKEND_STORE_URI": uri,
           "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_DEFAULT_PERMISSION": "EDIT",
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-from-a-secret"}
    out = subprocess.run(["sh", str(CLUSTER / "mlflow-entrypoint.sh"), "--host=0.0.0.0", "--app-name=basic-auth"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "args").read_text().split() == ["server", "--host=0.0.0.0", "--app-name=basic-auth"]
    assert oct(ini.stat().st_mode & 0o777) == "0o600"
    assert "s3cret" not in ini.read_text()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k != "PATH"})
    try:
        config = read_auth_config()
    finally:
        for k, v in old.items():
            if k != "PATH":
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert config.database_uri == uri
    assert config.default_permission == "EDIT"
    assert (config.admin_username, config.admin_password) == ("admin", "s3cret-from-a-secret")


def test_mlflow_entrypoint_needs_the_backend_store(tmp_path):
    out = subprocess.run(["sh", str(CLUSTER / "mlflow-entrypoint.sh")], env={"PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in out.stderr
