"""A real 2-worker Ray Train run (gloo DDP) reading shards from the local S3 server, logging to a
real mlflow server."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import experiment

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow]


def test_two_worker_run_writes_checkpoints_and_mlflow_metrics(tmp_path, s3_server, mlflow_server, ray_cluster):
    """Also the tracking contract of a real run: params (config, git SHA, versions), tags, system
    metrics, the resolved config, eval report and curves as artifacts, one run for two workers;
    the S3 keys and a password in the tracking URI never reach MLflow."""
    from cliplab.checkpoint import load_config, load_trainer_state
    from cliplab.train.launch import run_training
    from test_tracking import _everything_logged

    uri_with_pw = mlflow_server.uri.replace("http://", "http://cliplab:planted-uri-pw-93@")
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                                            "tracking.uri": uri_with_pw,
                                                            "tracking.run_name": "two-worker-run"})
    result = run_training(cfg, name="two-workers")
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 4
    assert metrics["val/num_samples"] > 0 and 0.0 <= metrics["val/image_to_text_R1"] <= 1.0

    # checkpoints: the one at step 2 and the final one, each complete
    ckpt_dirs = sorted(p for p in (Path(cfg.storage_path) / "two-workers").glob("checkpoint_*") if p.is_dir())
    assert len(ckpt_dirs) == 2
    final = Path(result.checkpoint.path)
    assert {"model.pt", "objective.pt", "trainer.pt", "config.json"} <= {p.name for p in final.iterdir()}
    assert load_trainer_state(final)["step"] == 4
    # the saved config is the run's, with the tracking URI's password masked (the MLflow redactor)
    from cliplab.config import with_overrides
    from cliplab.redaction import Redactor

    assert load_config(final) == with_overrides(cfg, {"tracking.uri": Redactor().text(uri_with_pw)})
    assert "planted-uri-pw-93" not in (final / "config.json").read_text()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.params["train.world_size"] == "2"
    assert run.data.params["objective.name"] == "clip"
    assert run.data.tags["objective"] == "clip"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "val/image_to_text_R1")[-1].step == 4
    assert run.info.status == "FINISHED"

    exp = client.get_experiment_by_name(cfg.tracking.experiment)  # two workers, one run: rank 0 logs
    assert len(client.search_runs([exp.experiment_id], "attributes.run_name = 'two-worker-run'")) == 1
    params, tags = run.data.params, run.data.tags
    assert params["git.sha"] not in ("", "unknown") and len(params["git.sha"].split("+")[0]) == 40
    assert {"version.torch", "version.ray", "version.open_clip", "version.cliplab"} <= set(params)
    assert params["version.ray"] == "2.60.0"
    assert (tags["model"], tags["dataset"]) == ("cliplab-tiny", cfg.data.train) and "sweep" in tags
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "config.json", "eval", "plots"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/learning_curves.png"}
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/eval_report.json",
                                                       str(tmp_path))).read_text())
    assert report["val/image_to_text_R1"] == pytest.approx(metrics["val/image_to_text_R1"])
    secrets = [s3_server.access_key, s3_server.secret_key, "planted-uri-pw-93"]
    logged = _everything_logged(client, run.info.run_id, tmp_path)
    assert [(where, s) for where, text in logged for s in secrets if s in text] == []


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["siglip", "cloob", "meru"])
def test_presets_train_in_the_two_worker_run(preset, tmp_path, s3_server, mlflow_server, ray_cluster):
    from cliplab.train.launch import run_training

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{"objective.name": preset, "train.max_steps": 2,
                                                            "train.checkpoint_every": 100})
    result = run_training(cfg, name=f"preset-{preset}")
    assert result.error is None and result.metrics["step"] == 2
    run = MlflowClient(mlflow_server.uri).get_run(result.metrics["mlflow_run_id"])
    assert run.data.tags["objective"] == preset
    assert "train/loss" in run.data.metrics and "scalars/logit_scale" in run.data.metrics
    if preset == "meru":
        assert {"train/loss/entailment", "scalars/curvature"} <= set(run.data.metrics)
    if preset == "cloob":
        assert run.data.metrics["scalars/hopfield_beta"] == pytest.approx(8.0)


@pytest.mark.slow
def test_caption_embeddings_then_xclr_trains_with_two_views(tmp_path, s3_server, mlflow_server, ray_cluster,
                                                            emoji_corpus):
    """`data embed-captions` as a Ray Data job, then the xclr preset joins them by key."""
    import pyarrow.parquet as pq

    from cliplab.config import S3Config
    from cliplab.data.captions import embed_captions, load_caption_table
    from cliplab.data.shards import read_shard_samples
    from cliplab.data.sources import resolve_shards
    from cliplab.train.launch import run_training

    corpus, stats = emoji_corpus
    shards = resolve_shards(str(corpus / "train"), S3Config())
    out, rows = embed_captions(shards, str(tmp_path / "captions"))
    assert rows == stats["splits"]["train"]["samples"]
    table = load_caption_table(out, S3Config())
    keys = {s.key for shard in shards.paths for s in read_shard_samples(shard)}
    assert set(table) == keys
    emb = next(iter(table.values()))
    assert emb.shape == (384,) and abs(float((emb ** 2).sum()) - 1) < 1e-4
    assert pq.read_table(out).num_rows == rows

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "objective.name": "xclr", "data.caption_embeddings": out,
        "train.max_steps": 2, "train.checkpoint_every": 100})
    result = run_training(cfg, name="xclr")
    assert result.error is None and result.metrics["step"] == 2
    run = MlflowClient(mlflow_server.uri).get_run(result.metrics["mlflow_run_id"])
    assert run.data.tags["objective"] == "xclr" and "train/loss" in run.data.metrics
