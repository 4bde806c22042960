"""Determinism: the same seed gives the same samples, crops and loss curve, wherever the samples
are decoded (Ray Data tasks or the worker's own thread)."""

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import experiment


def _rank_specs(corpus, *, epoch: int, world: int = 1, rank: int = 0):
    from cliplab.config import DataConfig, S3Config
    from cliplab.data.index import build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.data.stream import RankStream

    index = build_train_index([("train", 1.0, resolve_shards(str(corpus / "train"), S3Config()))])
    stream = RankStream(index, DataConfig(train=str(corpus / "train"), seed=3, shuffle_window=64), "cliplab-tiny",
                        rank=rank, world=world, steps=1, decode_on="worker")
    return stream, stream.specs(stream.plan(epoch), 0)


def _images_by_key(stream, specs) -> dict[str, np.ndarray]:
    from cliplab.data.stream import worker_blocks

    out = {}
    for block in worker_blocks(specs, stream._decode_kwargs(), prefetch=2):
        out.update({k: img for k, img, skip in zip(block["key"], block["image"], block["skip"], strict=True) if not skip})
    return out


def test_crops_are_seeded_per_sample_and_leave_torch_rng_alone(emoji_corpus):
    """The same seed and epoch give the same crop of every sample, on any rank of any world size;
    another epoch gives other crops; decoding draws nothing from torch's global generator (which
    the training step shares when the worker decodes in its own thread)."""
    import torch

    corpus = emoji_corpus[0]
    torch.manual_seed(0)
    before = torch.random.get_rng_state().clone()
    stream, specs = _rank_specs(corpus, epoch=0)
    first = _images_by_key(stream, specs)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = _images_by_key(*_rank_specs(corpus, epoch=0))
    assert len(first) > 100 and first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)

    halves = {}
    for rank in (0, 1):  # two ranks of world 2 see other slices, but each sample gets its world-1 crop
        halves.update(_images_by_key(*_rank_specs(corpus, epoch=0, world=2, rank=rank)))
    shared = sorted(halves.keys() & first.keys())
    assert len(shared) >= len(first) - 1
    assert all(np.array_equal(first[k], halves[k]) for k in shared)

    later = _images_by_key(*_rank_specs(corpus, epoch=1))
    differs = sum(not np.array_equal(first[k], later[k]) for k in first)
    assert differs > 0.8 * len(first), f"only {differs} of {len(first)} crops changed between epochs"


def test_worker_blocks_raise_the_decode_error_and_stop_early(emoji_corpus):
    """An error in the decode thread reaches the consumer; a consumer that stops early stops it."""
    import threading

    from cliplab.data.stream import worker_blocks

    stream, specs = _rank_specs(emoji_corpus[0], epoch=0)
    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match="no-such-model"):
        list(worker_blocks(specs, {**stream._decode_kwargs(), "model_name": "no-such-model"}, prefetch=1))
    blocks = worker_blocks(specs, stream._decode_kwargs(), prefetch=1)
    next(blocks)
    blocks.close()
    assert not any(t.name == "cliplab-decode" and t.is_alive() for t in threading.enumerate())


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_same_seed_same_loss_curve_whether_tasks_or_the_worker_decode(tmp_path, s3_server, mlflow_server,
                                                                      ray_cluster):
    """Two 2-worker runs with one seed, one decoding in Ray Data tasks and one in the workers'
    threads: the same loss at every step, to float tolerance. A third with another data seed
    differs, so the comparison can fail."""
    from cliplab.train.launch import run_training

    def curve(name: str, **overrides) -> list[float]:
        cfg = experiment(tmp_path, s3_server, mlflow_server, **{"train.max_steps": 6, "train.checkpoint_every": 100,
                                                                "tracking.run_name": name, **overrides})
        result = run_training(cfg, name=name)
        assert result.error is None
        history = MlflowClient(mlflow_server.uri).get_metric_history(result.metrics["mlflow_run_id"], "train/loss")
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    tasks = curve("decode-in-tasks", **{"data.decode_on": "tasks"})
    worker = curve("decode-in-worker", **{"data.decode_on": "worker"})
    assert len(tasks) == 6
    np.testing.assert_allclose(worker, tasks, rtol=1e-5, atol=1e-6)
    other = curve("other-seed", **{"data.decode_on": "worker", "data.seed": 1})
    assert not np.allclose(other, tasks, rtol=1e-5, atol=1e-6)
