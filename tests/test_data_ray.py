"""The training stream on the real services: deterministic per-rank order, equal steps, and a
run stopped mid-epoch that resumes at the next unseen sample (every key exactly once); S3
faults stop the job in preflight with one clear line."""

import socket
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import experiment

pytestmark = [pytest.mark.s3]


def _recorded(folder: Path) -> dict[int, list[str]]:
    return {int(p.stem.removeprefix("rank")): [line.split("\t")[2] for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("rank*.tsv"))}


@pytest.mark.ray
@pytest.mark.mlflow
def test_stopped_mid_epoch_then_resumed_reads_every_sample_exactly_once_in_plan_order(
        tmp_path, s3_server, mlflow_server, ray_cluster, emoji_corpus):
    from cliplab.checkpoint import load_trainer_state
    from cliplab.train.launch import run_training, steps_per_epoch

    record = tmp_path / "keys"
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "data.val": None, "data.record_keys": str(record), "data.shuffle_window": 64,
        "train.max_steps": 5, "train.checkpoint_every": 100, "train.epochs": 1})
    steps = steps_per_epoch(cfg)
    assert steps == (emoji_corpus[1]["splits"]["train"]["samples"] // 2) // 16 == 11

    first = run_training(cfg, name="resume-data")
    assert first.error is None and first.metrics["step"] == 5
    position = load_trainer_state(Path(first.checkpoint.path))["data_position"]
    assert position["epoch"] == 0 and position["batches_done"] == 5 and len(position["positions"]) == 2
    part1 = _recorded(record)
    assert {r: len(k) for r, k in part1.items()} == {0: 5 * 16, 1: 5 * 16}

    resumed = run_training(experiment(tmp_path, s3_server, mlflow_server, **{
        "data.val": None, "data.record_keys": str(record), "data.shuffle_window": 64,
        "train.max_steps": None, "train.checkpoint_every": 100, "train.epochs": 1}), name="resume-data")
    assert resumed.error is None and resumed.metrics["step"] == steps
    both = _recorded(record)
    assert {r: len(k) for r, k in both.items()} == {0: steps * 16, 1: steps * 16}  # equal steps per rank
    every = [k for keys in both.values() for k in keys]
    dupes = [k for k, n in Counter(every).items() if n > 1]
    assert dupes == [] and len(every) == 2 * steps * 16

    # exactly the plan: each rank's keys, in order, are the first steps×16 of its rank plan
    for rank in (0, 1):
        assert both[rank] == plan_keys(cfg, s3_server, emoji_corpus, epoch=0, world=2, rank=rank)[:steps * 16]


def plan_keys(cfg, s3_server, emoji_corpus, *, epoch: int, world: int, rank: int) -> list[str]:
    """The sample keys of one rank's plan for ``epoch``, in plan order, read from the local corpus."""
    from cliplab.config import S3Config
    from cliplab.data import plan
    from cliplab.data.shards import read_shard_samples
    from cliplab.data.sources import resolve_shards
    from cliplab.train.launch import train_index

    shards = resolve_shards(cfg.data.train, S3Config(endpoint_url=s3_server.endpoint))
    corpus = emoji_corpus[0] / "train"
    keys = {(g, i): s.key for g, path in enumerate(shards.paths)
            for i, s in enumerate(read_shard_samples(corpus / Path(path).name))}
    p = plan.rank_plan(train_index(cfg), seed=cfg.data.seed, epoch=epoch, world=world, rank=rank,
                       window=cfg.data.shuffle_window, shuffle=cfg.data.shuffle_files)
    return [keys[(int(p.gid[q]), int(p.idx[q]))] for q in range(len(p))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault, message", [
    ("bucket", "S3 bucket 'no-such-bucket' does not exist at http://127.0.0.1:"),
    ("credentials", "S3 rejected the credentials for s3://cliplab/emoji/train/"),
    ("secret", "S3 rejected the credentials for s3://cliplab/emoji/train/"),  # a known key, a wrong secret
    ("endpoint", "cannot reach the S3 endpoint http://127.0.0.1:"),
])
def test_s3_faults_stop_preflight_within_seconds_and_say_which(fault, message, tmp_path, s3_server,
                                                                 mlflow_server, emoji_on_s3, monkeypatch):
    from cliplab.errors import DataError
    from cliplab.train.launch import preflight

    overrides = {"data.val": None}
    if fault == "bucket":
        overrides["data.train"] = "s3://no-such-bucket/emoji/train/"
    elif fault == "credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-either")
    elif fault == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        overrides["data.s3.endpoint_url"] = f"http://127.0.0.1:{_free_port()}"
    cfg = experiment(tmp_path, s3_server, mlflow_server, **overrides)
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        preflight(cfg)
    assert time.monotonic() - started < 10
    assert message in str(err.value)
    assert "not-the-secret-either" not in str(err.value) and s3_server.secret_key not in str(err.value)


@pytest.mark.parametrize("weights", [(3.0, 1.0)])
def test_two_weighted_sources_mix_by_weight_on_s3(weights, tmp_path, s3_server, mlflow_server, emoji_on_s3):
    """Two sources (the emoji train and val splits on S3): each epoch's share follows the weights."""
    from cliplab.data import plan
    from cliplab.train.launch import preflight, train_index

    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "data.train": "", "data.val": None,
        "data.sources": [{"url": "s3://cliplab/emoji/train/", "weight": weights[0], "name": "big"},
                         {"url": "s3://cliplab/emoji/val/", "weight": weights[1], "name": "small"}]})
    prep = preflight(cfg)
    assert len(prep.sources) == 2
    index = train_index(cfg, prep)
    for epoch in range(2):
        gid, _ = plan.epoch_sequence(index, seed=0, epoch=epoch)
        share = Counter(index.names[index.shard_source[g]] for g in gid.tolist())
        assert share["big"] / len(gid) == pytest.approx(weights[0] / sum(weights), abs=0.01)


@pytest.mark.ray
def test_a_connected_ray_driver_indexes_shards_as_ray_tasks_with_the_threaded_result(
        tmp_path, s3_server, ray_cluster, monkeypatch):
    import ray
    from ray.util.state import list_tasks

    from cliplab.config import S3Config
    from cliplab.data.index import index_shards
    from cliplab.data.sources import resolve_shards

    shards = resolve_shards("s3://cliplab/emoji/train/", S3Config(endpoint_url=s3_server.endpoint))
    monkeypatch.setenv("CLIPLAB_INDEX_CACHE", str(tmp_path / "on-ray"))
    assert ray.is_initialized()
    on_ray = index_shards(shards)
    tasks = list_tasks(filters=[("name", "=", "scan_shard")], raise_on_missing_output=False)
    assert len({t.task_id for t in tasks}) >= len(shards.paths) > 1

    monkeypatch.setenv("CLIPLAB_INDEX_CACHE", str(tmp_path / "threads"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the same call as a Ray-less process makes
    threaded = index_shards(shards)
    assert [(e.path, e.starts.tolist(), e.ends.tolist(), e.skipped) for e in on_ray] == \
           [(e.path, e.starts.tolist(), e.ends.tolist(), e.skipped) for e in threaded]
    assert sum(len(e) for e in on_ray) > 0
    assert len(list((tmp_path / "on-ray").glob("*.pkl"))) == len(shards.paths)  # the driver cached them
