"""Tracking: redaction, the on-disk spool through a real MLflow outage, run contents, secrets scan,
the pyfunc model (fresh-process round trip, `mlflow models serve`) and the open_clip export."""

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import experiment

pytestmark = [pytest.mark.mlflow]

PLANTED = {
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-7f3a9c",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-51d2",
    "HF_TOKEN": "hf_plantedtoken88",
    "CLIPLAB_DB_PASSWORD": "planted-db-pw-0b7e",
}


# ---------------------------------------------------------------------------------- redaction

def test_redactor_masks_env_secrets_uri_passwords_and_secret_keys():
    from cliplab.redaction import Redactor, is_secret_name, secret_values

    env = {**PLANTED, "TOKENIZERS_PARALLELISM": "false", "HOME": "/home/u", "AWS_ACCESS_KEY_ID": "AKIAPLANTED1"}
    secrets = secret_values(env)
    assert set(secrets) == {*PLANTED.values(), "AKIAPLANTED1"}  # not "false", not HOME
    r = Redactor(secrets)
    assert r.text("http://alice:hunter2pw@mlflow:5000/api") == "http://alice:***@mlflow:5000/api"
    assert r.text("s3://b/x?X-Amz-Signature=abcd1234&part=1") == "s3://b/x?X-Amz-Signature=***&part=1"
    assert r.text("key=planted-aws-secret-7f3a9c;") == "key=***;"
    params = r.params({"data.s3.secret_access_key": "whatever", "data.label_key": "group",
                       "tracking.uri": "https://u:planted-db-pw-0b7e@host", "note": "hf_plantedtoken88"})
    assert params == {"data.s3.secret_access_key": "***", "data.label_key": "group",
                      "tracking.uri": "https://u:***@host", "note": "***"}
    assert not is_secret_name("TOKENIZERS_PARALLELISM") and is_secret_name("RAY_AUTH_TOKEN")


# ---------------------------------------------------------------------------------- the spool

def _new_run(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("spool") or client.get_experiment(client.create_experiment("spool"))
    return client.create_run(exp.experiment_id, run_name=name).info.run_id


def test_metrics_survive_an_mlflow_outage_and_none_is_lost(tmp_path, monkeypatch):
    """Stop the real server mid-run: logging never blocks, records wait on disk, and when the
    server is back (same port, same store) every step's metrics arrive with their own step."""
    from cliplab.services import MlflowService
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    root = tmp_path / "mlflow"
    server = MlflowService(root).start()
    port, uri = server.port, server.uri
    run_id = _new_run(uri, "outage")
    tracker = SpoolingTracker(uri, run_id, spool_root=tmp_path / "spool", flush_timeout_s=60, retry_s=0.2,
                              max_retry_s=1.0)
    tracker.log_params({"optim.lr": 1e-3})
    for step in range(10):
        tracker.log_metrics({"train/loss": 10.0 - step, "train/lr": 1e-3}, step)
    assert tracker.flush(30), "records were not delivered while the server was up"
    server.stop()

    slowest = 0.0
    for step in range(10, 40):  # the outage: training keeps producing
        t0 = time.perf_counter()
        tracker.log_metrics({"train/loss": 10.0 - step, "train/lr": 1e-3}, step)
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.02)
    assert slowest < 0.5, f"a log call blocked for {slowest:.2f} s during the outage"
    assert tracker.pending > 0 and tracker.outages >= 1
    assert len((tmp_path / "spool" / run_id / "ops.jsonl").read_text().splitlines()) == 1 + 40

    with MlflowService(root, port=port):
        tracker.finish()
        client = MlflowClient(uri)
        for key in ("train/loss", "train/lr"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(40)), key
        assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}[25] == -15.0
        assert tracker.metrics_produced == tracker.metrics_sent == 80
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
    assert not (tmp_path / "spool" / run_id).exists(), "a fully delivered spool is removed"


def test_a_spool_left_by_a_long_outage_is_flushed_later_by_the_cli(tmp_path):
    from cliplab.services import MlflowService
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    root = tmp_path / "mlflow"
    server = MlflowService(root).start()
    port, uri = server.port, server.uri
    run_id = _new_run(uri, "later")
    server.stop()
    tracker = SpoolingTracker(uri, run_id, spool_root=tmp_path / "spool", flush_timeout_s=1, retry_s=0.2)
    for step in range(5):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.finish()  # gives up after 1 s, keeps the records
    spool = tmp_path / "spool" / run_id
    assert (spool / "ops.jsonl").is_file()

    with MlflowService(root, port=port):
        proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "tracking", "flush", str(spool)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "sent 6 records" in proc.stdout  # 5 metric records + the finish
        client = MlflowClient(uri)
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]
        assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()


def test_a_restarted_run_sends_what_a_killed_process_left_in_the_spool(tmp_path):
    """A worker SIGKILLed during an outage leaves unsent records; the tracker of its replacement
    (same run id, as after a restart from a checkpoint) sends them first, then its own."""
    from cliplab.services import MlflowService
    from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries

    quiet_mlflow_retries()
    root, spool_root = tmp_path / "mlflow", tmp_path / "spool"
    server = MlflowService(root).start()
    port, uri = server.port, server.uri
    run_id = _new_run(uri, "restarted")
    server.stop()
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from cliplab.tracking.spool import SpoolingTracker, quiet_mlflow_retries
quiet_mlflow_retries()
t = SpoolingTracker({uri!r}, {run_id!r}, spool_root={str(spool_root)!r}, retry_s=0.2)
for step in range(1, 8):
    t.log_metrics({{"train/loss": float(step)}}, step)
print("logged", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "logged"
    finally:
        child.kill()
        child.wait(timeout=30)
    assert len((spool_root / run_id / "ops.jsonl").read_text().splitlines()) == 7

    with MlflowService(root, port=port):
        tracker = SpoolingTracker(uri, run_id, spool_root=spool_root, flush_timeout_s=60, retry_s=0.2)
        tracker.log_metrics({"train/resumed_from_step": 5.0}, 5)
        for step in range(6, 10):  # the redone steps and beyond
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.finish()
        client = MlflowClient(uri)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        assert steps == [1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 9]
        assert [m.step for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [5]
        assert client.get_run(run_id).info.status == "FINISHED"
    assert not (spool_root / run_id).exists()


# ---------------------------------------------------------------------------------- secrets scan

def _everything_logged(client: MlflowClient, run_id: str, tmp_path: Path) -> list[tuple[str, str]]:
    """(where, text) for every param, tag, metric name and artifact file of a run."""
    import mlflow

    run = client.get_run(run_id)
    found = [(f"param {k}", f"{k}={v}") for k, v in run.data.params.items()]
    found += [(f"tag {k}", f"{k}={v}") for k, v in run.data.tags.items()]
    found += [(f"metric {k}", k) for k in run.data.metrics]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "artifacts"),
                                                     tracking_uri=client.tracking_uri))
    found += [(f"artifact {p.relative_to(local)}", p.read_bytes().decode("utf-8", "replace"))
              for p in local.rglob("*") if p.is_file()]
    return found


def test_a_run_shorter_than_the_sampling_interval_still_gets_system_metrics(mlflow_server):
    """MLflow's sampler publishes only after a full interval; stopping it publishes what it holds."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from cliplab.tracking.system_metrics import stop_system_metrics as _stop_system_metrics

    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment(f"short-run-{time.time_ns()}"))
    monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=60.0, samples_before_logging=1,
                                   tracking_uri=mlflow_server.uri)
    monitor.start()
    time.sleep(0.5)
    _stop_system_metrics(monitor)
    logged = client.get_run(run.info.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(logged)
    assert 0.0 <= logged["system/cpu_utilization_percentage"] <= 100.0 * os.cpu_count()


def test_no_planted_secret_reaches_mlflow_from_the_tracker(tmp_path, monkeypatch, mlflow_server):
    from cliplab.config import flatten, to_dict
    from cliplab.tracking import build_tracker
    from cliplab.tracking.artifacts import write_config

    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    uri_with_pw = mlflow_server.uri.replace("http://", "http://cliplab:planted-uri-pw-93@")
    cfg = experiment(tmp_path, type("S3", (), {"endpoint": "http://127.0.0.1:1"}), mlflow_server,
                     **{"tracking.uri": uri_with_pw, "tracking.run_name": f"run-{PLANTED['HF_TOKEN']}"})
    tracker = build_tracker(cfg.tracking, rank=0, run_name=cfg.tracking.run_name,
                            tags={"dataset": f"s3://u:{PLANTED['AWS_SECRET_ACCESS_KEY']}@bucket/x"})
    tracker.log_params({**flatten(to_dict(cfg)), "env.note": PLANTED["CLIPLAB_DB_PASSWORD"]})
    tracker.log_metrics({f"weird/{PLANTED['MLFLOW_TRACKING_TOKEN']}": 1.0, "train/loss": 2.0}, 1)
    for path in write_config({**to_dict(cfg), "comment": PLANTED["AWS_SECRET_ACCESS_KEY"]}, tmp_path / "cfg"):
        tracker.log_artifact(path)
    tracker.finish()

    secrets = [*PLANTED.values(), "planted-uri-pw-93"]
    logged = _everything_logged(MlflowClient(mlflow_server.uri), tracker.run_id, tmp_path)
    assert any(where.startswith("artifact config.yaml") for where, _ in logged)
    assert any(text == "tracking.uri=http://cliplab:***@" + mlflow_server.uri[len("http://"):] for _, text in logged)
    leaks = [(where, s) for where, text in logged for s in secrets if s in text]
    assert leaks == []


# ---------------------------------------------------------------------------------- the model

def _checkpoint(tmp_path: Path, objective: str = "meru") -> Path:
    from cliplab.checkpoint import save_checkpoint
    from cliplab.config import ExperimentConfig, ModelConfig, ObjectiveConfig
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective
    from cliplab.train.step import build_optimizer, cosine_with_warmup

    torch.manual_seed(0)
    cfg = ExperimentConfig(model=ModelConfig(name="cliplab-tiny"), objective=ObjectiveConfig(name=objective))
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    with torch.no_grad():
        module.objective.log_curvature.fill_(np.log(0.7))  # not the init, so a lost scalar shows
    optimizer = build_optimizer(module, cfg.optim)
    return save_checkpoint(tmp_path / "ckpt", module, optimizer, cosine_with_warmup(optimizer, 1, 10),
                           step=1, epoch=0, cfg=cfg)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (72, 72), color).save(buf, format="PNG")
    return buf.getvalue()


def _reference_embeddings(ckpt: Path, images: list[bytes], texts: list[str]):
    """Embeddings straight from the checkpoint, without MLflow."""
    from cliplab.checkpoint import load_config, load_weights
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective

    cfg = load_config(ckpt)
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    load_weights(ckpt, module)
    module.eval()
    with torch.no_grad():
        pixels = torch.stack([bundle.val_transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        img = module.objective.embed(module.model.encode_image(pixels, normalize=False), "image")
        txt = module.objective.embed(module.model.encode_text(bundle.tokenizer(texts), normalize=False), "text")
    return img.numpy(), txt.numpy(), bundle, module


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    from cliplab.tracking.registry import register_checkpoint

    tmp = tmp_path_factory.mktemp("registered")
    ckpt = _checkpoint(tmp)
    info = register_checkpoint(str(ckpt), "tracking-test", "champion", uri=mlflow_server.uri)
    return ckpt, info


def test_pyfunc_in_a_fresh_process_gives_the_checkpoint_embeddings(registered, mlflow_server, tmp_path):
    ckpt, info = registered
    images, texts = [_png((220, 40, 40)), _png((30, 30, 200))], ["a red square", "a blue square"]
    script = f"""
import base64, json, sys
import mlflow, numpy as np, pandas as pd
mlflow.set_tracking_uri({mlflow_server.uri!r})
model = mlflow.pyfunc.load_model("models:/tracking-test@champion")
images = [base64.b64decode(s) for s in json.loads(sys.argv[1])]
out = model.predict(pd.DataFrame({{"image": images, "text": {texts!r}}}))
b64 = model.predict(pd.DataFrame({{"image": json.loads(sys.argv[1])}}))  # base64 strings work too
np.savez(sys.argv[2], image=np.array(out["image_embedding"].tolist()), text=np.array(out["text_embedding"].tolist()),
         sim=out["similarity"].to_numpy(), image_b64=np.array(b64["image_embedding"].tolist()),
         schema=str(model.metadata.signature.inputs))
"""
    arg = json.dumps([base64.b64encode(b).decode() for b in images])
    proc = subprocess.run([sys.executable, "-c", script, arg, str(tmp_path / "out.npz")], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "TMPDIR": str(tmp_path)})  # mlflow leaves its download there
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    ref_img, ref_txt, _, module = _reference_embeddings(ckpt, images, texts)
    assert ref_img.shape == (2, 128)  # MERU: the space components of a point on the hyperboloid
    np.testing.assert_allclose(got["image"], ref_img, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["text"], ref_txt, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["image_b64"], ref_img, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref_sim = module.objective.similarity(torch.from_numpy(ref_img), torch.from_numpy(ref_txt)).diagonal()
    np.testing.assert_allclose(got["sim"], ref_sim.numpy(), rtol=1e-6, atol=1e-6)
    assert "'image': binary (optional)" in str(got["schema"]) and "'text': string (optional)" in str(got["schema"])


def test_open_clip_export_artifact_reproduces_the_embeddings(registered, mlflow_server, tmp_path):
    import mlflow
    import open_clip

    ckpt, info = registered
    local = Path(mlflow.artifacts.download_artifacts(run_id=info["run_id"], artifact_path="open_clip",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_server.uri))
    assert {"model.pt", "objective.pt", "cliplab-tiny.json", "README.md"} <= {p.name for p in local.iterdir()}
    open_clip.add_model_config(local / "cliplab-tiny.json")
    model = open_clip.create_model("cliplab-tiny", pretrained=str(local / "model.pt")).eval()
    _, _, bundle, module = _reference_embeddings(ckpt, [_png((1, 2, 3))], ["x"])
    pixels = torch.stack([bundle.val_transform(Image.new("RGB", (64, 64), (90, 160, 20)))])
    tokens = bundle.tokenizer(["a green square"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), module.model.encode_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(tokens), module.model.encode_text(tokens), rtol=0, atol=0)
    scalars = torch.load(local / "objective.pt")
    assert float(scalars["log_curvature"].exp()) == pytest.approx(0.7)


@pytest.mark.slow
def test_mlflow_models_serve_answers_http_on_localhost(registered, mlflow_server, tmp_path):
    from cliplab.services.base import free_port

    ckpt, _ = registered
    port = free_port()
    bindir = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PATH": f"{bindir}:{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}  # mlflow downloads the model to a temporary folder it never deletes
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve",
                             "-m", "models:/tracking-test@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up in 120 s"
            time.sleep(1)
        image = _png((220, 40, 40))
        body = json.dumps({"dataframe_split": {"columns": ["image", "text"],
                                               "data": [[base64.b64encode(image).decode(), "a red square"]]}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        row = pd.DataFrame(answer["predictions"]).iloc[0]
        ref_img, ref_txt, _, _ = _reference_embeddings(ckpt, [image], ["a red square"])
        np.testing.assert_allclose(np.array(row["image_embedding"]), ref_img[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.array(row["text_embedding"]), ref_txt[0], rtol=0, atol=1e-6)
        assert np.isfinite(row["similarity"])
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_training_run_keeps_every_step_through_an_mlflow_outage(tmp_path, s3_server, ray_cluster):
    """The real trainer against its own MLflow server, which is stopped once the run has logged
    a few steps and restarted (same port, same store) 8 s later."""
    import threading

    from cliplab.services import MlflowService
    from cliplab.train.launch import run_training

    root = tmp_path / "mlflow"
    server = MlflowService(root).start()
    port, uri = server.port, server.uri
    steps = 24
    cfg = experiment(tmp_path, s3_server, server, **{"train.max_steps": steps, "train.epochs": 3,
                                                     "train.checkpoint_every": 100, "train.eval_every_epoch": False,
                                                     "tracking.experiment": "outage"})
    window: dict[str, float] = {}
    restarted: list = []

    def outage():
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("outage")
            runs = client.search_runs([exp.experiment_id], max_results=1) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                break
            time.sleep(0.1)
        window["down"] = time.time() * 1000
        server.stop()
        time.sleep(8)
        window["up"] = time.time() * 1000
        restarted.append(MlflowService(root, port=port).start())

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        result = run_training(cfg, name="outage")
        watcher.join(timeout=60)
        assert result.error is None and result.metrics["step"] == steps
        client = MlflowClient(uri)
        history = client.get_metric_history(result.metrics["mlflow_run_id"], "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
        during = [m.step for m in history if window["down"] <= m.timestamp <= window["up"]]
        assert during, "no step was produced while the server was down: the outage missed the run"
        assert client.get_metric_history(result.metrics["mlflow_run_id"], "val/image_to_text_R1")
        assert client.get_run(result.metrics["mlflow_run_id"]).info.status == "FINISHED"
    finally:
        for svc in restarted:
            svc.stop()
        server.stop()


@pytest.mark.s3
def test_the_embedded_server_can_keep_artifacts_on_s3(tmp_path, s3_server):
    from cliplab.services import MlflowService

    env = {**s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    with MlflowService(tmp_path / "mlflow", artifacts_destination="s3://cliplab/mlflow-artifacts", env=env) as svc:
        run_id = _new_run(svc.uri, "s3-artifacts")
        (tmp_path / "report.json").write_text('{"val/R1": 0.5}')
        MlflowClient(svc.uri).log_artifact(run_id, str(tmp_path / "report.json"), "eval")
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="cliplab",
                                                                      Prefix="mlflow-artifacts/")["Contents"]]
        assert any(k.endswith(f"{run_id}/artifacts/eval/report.json") for k in keys), keys
