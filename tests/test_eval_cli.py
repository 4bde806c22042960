"""``cliplab eval`` end to end: an untrained tiny MERU model saved as the trainer saves it, a small
emoji group zero-shot set and the emoji val shards on S3, embedded by Ray tasks, logged to MLflow."""

import json
from pathlib import Path

import pytest
import torch

from cliplab.cli.main import main

CLASSIFICATION_KEYS = {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class", "zeroshot_num_classes",
                       "zeroshot_chance_top1", "num_samples", "num_templates", "lens/effective_rank_image",
                       "lens/uniformity_image", "lens/ajne_image", "lens/origin_distance_image"}
RETRIEVAL_KEYS = {f"{d}_R{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} | {
    "num_samples", "retrieval_chance_R1", "lens/alignment", "lens/effective_rank_text", "lens/uniformity_text",
    "lens/ajne_text", "lens/entailment_rate", "lens/origin_distance_text", "lens/text_nearer_origin_rate",
    "traversal/specific_to_generic", "traversal/monotone", "traversal/full_chain", "traversal/mean_length",
    "traversal/num_images"}


def save_tiny_checkpoint(path: Path, objective: str = "meru") -> Path:
    from cliplab.checkpoint import save_checkpoint
    from cliplab.config import ExperimentConfig, with_overrides
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective

    cfg = with_overrides(ExperimentConfig(), {"model.name": "cliplab-tiny", "objective.name": objective})
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(path, module, optimizer, scheduler, step=3, epoch=0, cfg=cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint_000003")


@pytest.fixture(scope="module")
def emoji_eval(tmp_path_factory):
    from cliplab.data.emoji import build_emoji_eval_set

    out = tmp_path_factory.mktemp("sets") / "emoji-eval"
    build_emoji_eval_set(out, image_px=64, limit=27, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_report(checkpoint, emoji_eval, ray_cluster, mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = main(["eval", "--model", str(checkpoint), "--data", str(emoji_eval), "--data", "s3://cliplab/emoji/val/",
                 "--out", str(out), "--tracking-uri", mlflow_server.uri, "--experiment", "eval-test", "--quiet"])
    assert code == 0
    return out, json.loads((out / "eval_report.json").read_text())


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_eval_writes_the_report_and_logs_it_to_mlflow(ray_report, mlflow_server):
    from mlflow import MlflowClient

    out, report = ray_report
    assert report["objective"] == "meru" and report["geometry"] == "lorentz"
    cls, ret = report["datasets"]
    assert (cls["name"], cls["kind"], ret["name"], ret["kind"]) == ("emoji-eval", "classification",
                                                                    "emoji-val", "retrieval")
    assert CLASSIFICATION_KEYS <= set(cls["metrics"]) and RETRIEVAL_KEYS <= set(ret["metrics"])
    m = cls["metrics"]
    assert m["num_samples"] == 27 and m["zeroshot_num_classes"] == 9 and m["num_templates"] == 4
    assert 0 <= m["zeroshot_top1"] <= m["zeroshot_top5"] <= 1 and 0 <= m["zeroshot_mean_per_class"] <= 1
    r = ret["metrics"]
    assert r["num_samples"] >= 20
    for d in ("image_to_text", "text_to_image"):
        assert 0 <= r[f"{d}_R1"] <= r[f"{d}_R5"] <= r[f"{d}_R10"] <= 1
    assert 0 <= r["lens/entailment_rate"] <= 1 and r["lens/origin_distance_text"] > 0
    assert 1 <= r["lens/effective_rank_text"] <= 128 and 0 <= r["lens/alignment"] <= 4
    assert 0 <= r["traversal/specific_to_generic"] <= r["traversal/monotone"] <= 1
    assert ret["traversal_examples"] and all(e["traversal"][-1] == "[ROOT]" for e in ret["traversal_examples"])
    md = (out / "eval_report.md").read_text()
    assert "## emoji-eval: zero-shot classification, 27 images, 9 classes" in md and "| zeroshot_top1 |" in md
    assert "## emoji-val: retrieval" in md and "Image traversals toward [ROOT]" in md

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.metrics["eval/emoji-eval/zeroshot_top1"] == pytest.approx(m["zeroshot_top1"])
    assert run.data.metrics["eval/emoji-val/lens/entailment_rate"] == pytest.approx(r["lens/entailment_rate"])
    assert run.data.params["objective"] == "meru" and run.data.tags["cliplab.kind"] == "eval"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {"eval/eval_report.json",
                                                                             "eval/eval_report.md"}
    assert all("@" not in k for k in run.data.metrics)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_local_eval_of_a_run_folder_matches_the_ray_tasks(ray_report, checkpoint, emoji_eval, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["eval", "--model", str(checkpoint.parent), "--data", str(emoji_eval), "--data",
                 "s3://cliplab/emoji/val/", "--out", str(tmp_path), "--local", "--quiet", "--tasks", "1"])
    assert code == 0
    local = json.loads((tmp_path / "eval_report.json").read_text())
    assert "mlflow_run_id" not in local
    for a, b in zip(local["datasets"], ray_report[1]["datasets"], strict=True):
        for key, value in b["metrics"].items():
            if value is None or key.startswith("traversal/"):  # traversals take the images in order
                continue
            assert a["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.mlflow
def test_eval_of_a_registered_model(checkpoint, emoji_eval, mlflow_server, tmp_path):
    from cliplab.tracking.registry import register_checkpoint

    register_checkpoint(str(checkpoint), "eval-test-model", "champion", uri=mlflow_server.uri)
    args = ["eval", "--data", str(emoji_eval), "--local", "--quiet", "--traversals", "0"]
    assert main([*args, "--model", "models:/eval-test-model@champion", "--out", str(tmp_path / "a"),
                 "--tracking-uri", mlflow_server.uri]) == 0
    assert main([*args, "--model", str(checkpoint), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "eval_report.json").read_text()) for x in "ab")
    assert a["model"] == "models:/eval-test-model@champion"
    assert a["datasets"][0]["metrics"] == pytest.approx(b["datasets"][0]["metrics"])
    run = __import__("mlflow").MlflowClient(mlflow_server.uri).get_run(a["mlflow_run_id"])
    assert not any("@" in k for k in run.data.metrics) and run.data.params["model"].startswith("models:/")


def test_clear_one_line_errors(tmp_path, emoji_eval, checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = [
        (["--model", str(tmp_path / "nothing"), "--data", str(emoji_eval)], "no such checkpoint folder"),
        (["--model", "models:/x@champion", "--data", str(emoji_eval)], "--tracking-uri"),
        (["--model", str(tmp_path), "--data", str(emoji_eval)], "not a complete checkpoint"),
        (["--model", str(checkpoint), "--data", str(tmp_path / "none")], "point --data at a folder"),
        (["--model", str(checkpoint), "--data", str(emoji_eval), "--templates", "nope"], "--templates"),
    ]
    for args, message in cases:
        assert main(["eval", "--local", "--quiet", "--out", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
