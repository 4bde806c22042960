"""The epoch plan (mixing, shuffles, rank split), the shard index and the decode task, without Ray."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from cliplab.config import ConfigError, DataConfig, ExperimentConfig, S3Config, validate, with_overrides
from cliplab.data import plan
from cliplab.data.index import ShardIndex, TrainIndex, build_train_index
from cliplab.data.shards import read_shard_samples
from cliplab.data.sources import resolve_shards
from cliplab.data.stream import ROW_REASONS, Rebatcher, read_decode


def _fake_index(sizes_by_source, weights):
    shards, src = [], []
    for k, sizes in enumerate(sizes_by_source):
        for j, n in enumerate(sizes):
            starts = np.arange(n, dtype=np.int64) * 1024
            shards.append(ShardIndex(f"s{k}/shard-{j}.tar", starts, starts + 1024))
            src.append(k)
    names = tuple(f"source{k}" for k in range(len(sizes_by_source)))
    return TrainIndex(names, names, tuple(weights), (False,) * len(names), tuple(src), tuple(shards))


def _keys(index, p):
    return list(zip(p.gid.tolist(), p.idx.tolist(), strict=True))


def test_plan_is_deterministic_per_seed_and_epoch_and_reshuffles_each_epoch():
    index = _fake_index([[100] * 10], [1.0])
    a = plan.rank_plan(index, seed=3, epoch=0, world=2, rank=0, window=50)
    b = plan.rank_plan(index, seed=3, epoch=0, world=2, rank=0, window=50)
    assert _keys(index, a) == _keys(index, b)
    assert _keys(index, a) != _keys(index, plan.rank_plan(index, seed=4, epoch=0, world=2, rank=0, window=50))
    assert _keys(index, a) != _keys(index, plan.rank_plan(index, seed=3, epoch=1, world=2, rank=0, window=50))
    # samples are shuffled inside a window, not left in tar order
    assert a.idx[:50].tolist() != sorted(a.idx[:50].tolist())


def test_ranks_get_disjoint_equal_slices_covering_the_epoch():
    index = _fake_index([[37, 100, 5, 64]], [1.0])  # 206 samples
    world = 3
    plans = [plan.rank_plan(index, seed=0, epoch=2, world=world, rank=r, window=16) for r in range(world)]
    assert {len(p) for p in plans} == {206 // world}
    seen = [k for p in plans for k in _keys(index, p)]
    assert len(seen) == len(set(seen)) == 206 // world * world
    assert plan.steps_per_epoch(index, world, batch_size=8) == (206 // world) // 8


def test_mixing_weights_set_each_sources_share_of_the_epoch():
    index = _fake_index([[100] * 6, [50] * 4, [10] * 3], [0.5, 0.3, 0.2])  # 600 + 200 + 30 samples
    for epoch in range(3):
        gid, _ = plan.epoch_sequence(index, seed=1, epoch=epoch)
        share = Counter(index.shard_source[g] for g in gid.tolist())
        total = sum(share.values())
        assert total == 830
        assert [share[k] / total for k in range(3)] == pytest.approx([0.5, 0.3, 0.2], abs=1 / total)
    # the up-weighted small source repeats its samples; within one pass over it none repeats
    gid, idx = plan.epoch_sequence(index, seed=1, epoch=0)
    small = Counter((g, i) for g, i in zip(gid.tolist(), idx.tolist(), strict=True) if index.shard_source[g] == 2)
    assert max(small.values()) >= 5 and len(small) == 30
    # the down-weighted large source draws distinct samples
    large = Counter((g, i) for g, i in zip(gid.tolist(), idx.tolist(), strict=True) if index.shard_source[g] == 0)
    assert max(large.values()) == 1 and sum(large.values()) == 415


def test_quotas_sum_exactly():
    assert plan.quotas([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert sum(plan.quotas([7, 3], [0.333, 0.667])) == 10


def test_windows_resume_at_a_position():
    index = _fake_index([[100]], [1.0])
    p = plan.rank_plan(index, seed=0, epoch=0, world=1, rank=0, window=30)
    assert p.windows() == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert p.windows(45) == [(45, 60), (60, 90), (90, 100)]
    assert p.windows(100) == []


def test_config_accepts_weighted_sources_and_keeps_data_train():
    cfg = with_overrides(ExperimentConfig(), {"data.sources": [{"url": "s3://b/a/", "weight": 3},
                                                               {"url": "/d/{0..1}.tar", "name": "local"}]})
    validate(cfg)
    assert [(s.url, s.weight, s.name) for s in cfg.data.train_sources()] == [
        ("s3://b/a/", 3.0, "source0"), ("/d/{0..1}.tar", 1.0, "local")]
    assert DataConfig(train="x").train_sources()[0].url == "x"
    with pytest.raises(ConfigError, match="not both"):
        validate(with_overrides(cfg, {"data.train": "y"}))
    with pytest.raises(ConfigError, match="weight must be > 0"):
        validate(with_overrides(ExperimentConfig(), {"data.sources": [{"url": "a", "weight": 0}]}))
    with pytest.raises(ConfigError, match="data.train is empty"):
        validate(ExperimentConfig())


def test_index_and_decode_task_read_every_sample_in_plan_order(emoji_corpus):
    out, stats = emoji_corpus
    shards = resolve_shards(str(out / "train"), S3Config())
    index = build_train_index([("train", 1.0, shards)])
    assert int(index.counts().sum()) == stats["splits"]["train"]["samples"] and index.skipped() == {}
    keys = {(g, i): s.key for g, path in enumerate(shards.paths) for i, s in enumerate(read_shard_samples(path))}
    p = plan.rank_plan(index, seed=0, epoch=0, world=2, rank=1, window=40)
    spec = plan.read_spec(index, p, 10, 40)
    blocks = list(read_decode({"spec": [json.dumps(spec)]}, model_name="cliplab-tiny", s3="{}"))
    got = [k for b in blocks for k in b["key"]]
    assert got == [keys[(int(p.gid[q]), int(p.idx[q]))] for q in range(10, 40)]
    assert all((b["skip"] == 0).all() for b in blocks)
    assert blocks[0]["image"].dtype == np.uint8 and blocks[0]["image"].shape[1:] == (64, 64, 3)


def test_rebatcher_gives_exact_batches_and_counts_only_consumed_skips():
    code = {r: i for i, r in enumerate(ROW_REASONS)}

    def block(pos, skip):
        n = len(pos)
        return {"pos": np.array(pos), "skip": np.array([code[s] for s in skip]),
                "key": np.array([str(q) for q in pos], object), "image": np.zeros((n, 2, 2, 3), np.uint8)}

    r = Rebatcher(3)
    r.add(block([0, 1, 2, 3], ["ok", "corrupt_image", "ok", "ok"]))
    r.add(block([4, 5, 6, 7], ["ok", "decompression_bomb", "ok", "truncated_image"]))
    out = list(r.ready())
    assert [(b["pos"].tolist(), nxt, bad) for b, nxt, bad in out] == [([0, 2, 3], 4, Counter({"corrupt_image": 1}))]
    r.add(block([8], ["ok"]))
    (batch, nxt, bad), = r.ready()
    assert batch["pos"].tolist() == [4, 6, 8] and nxt == 9
    assert bad == Counter({"decompression_bomb": 1, "truncated_image": 1})
    assert r.leftover_bad() == Counter() and r.n == 0


def test_the_stream_normalises_uint8_images_like_torchvision_in_float64():
    """Workers ship uint8 HWC; the consumer's ToTensor + Normalize must match the float64 reference."""
    from cliplab.data.stream import RankStream

    stream = RankStream(None, DataConfig(train="unused"), "cliplab-tiny", rank=0, world=1, steps=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    out = stream.to_torch({"text": np.zeros((3, 4), np.int64), "image": images, "image_2": images[::-1].copy()})
    mean = np.asarray(stream.mean, np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(stream.std, np.float64).reshape(1, 3, 1, 1)
    ref = (images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0 - mean) / std
    for name, want in (("image", ref), ("image_2", ref[::-1])):
        got = out[name]
        assert got.dtype == torch.float32 and got.shape == (3, 3, 8, 6) and got.is_contiguous()
        np.testing.assert_allclose(got.numpy().astype(np.float64), want, rtol=0, atol=2e-6)
    assert out["text"].dtype == torch.int64
