"""The shard format (img2dataset layout) and the builders."""

import io
import json
import tarfile

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from cliplab.data.emoji import build_emoji_corpus
from cliplab.data.shards import build_shards, deterministic_split, read_shard_samples
from cliplab.errors import DataError


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [m.name for m in tar.getmembers()]


def test_emoji_shards_open_in_webdataset_with_matching_keys(emoji_corpus):
    out, stats = emoji_corpus
    urls = [str(out / "train" / name) for name in stats["splits"]["train"]["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert {"png", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        assert meta["caption"] == sample["txt"].decode("utf-8") == meta["name"]
        assert meta["group"] and meta["subgroup"]
        Image.open(io.BytesIO(sample["png"])).verify()
        seen += 1
    assert seen == stats["splits"]["train"]["samples"] > 0


def test_stats_count_what_the_tars_hold(emoji_corpus):
    out, stats = emoji_corpus
    total = 0
    for split, info in stats["splits"].items():
        n = sum(len(list(read_shard_samples(out / split / shard))) for shard in info["shards"])
        assert n == info["samples"]
        total += n
    assert total == stats["samples"] == sum(stats["groups"].values())
    assert stats["skipped"]["skin_tone_variant"] > 0
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["splits"]["val"]["samples"] == stats["splits"]["val"]["samples"]


def test_emoji_build_is_deterministic_and_every_group_has_val(tmp_path):
    a = build_emoji_corpus(tmp_path / "a", limit=150, image_px=32, progress=False)
    b = build_emoji_corpus(tmp_path / "b", limit=150, image_px=32, progress=False)
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        for shard in a["splits"][split]["shards"]:
            assert (tmp_path / "a" / split / shard).read_bytes() == (tmp_path / "b" / split / shard).read_bytes()
    val_groups = {s.meta["group"] for shard in a["splits"]["val"]["shards"]
                  for s in read_shard_samples(tmp_path / "a" / "val" / shard)}
    assert val_groups == set(a["groups"])


def test_deterministic_split_is_stable_and_close_to_the_fraction():
    keys = [f"{i:09d}" for i in range(5000)]
    first = [deterministic_split(k, 0.2, seed=3) for k in keys]
    assert first == [deterministic_split(k, 0.2, seed=3) for k in keys]
    assert 0.17 < first.count("val") / len(keys) < 0.23
    assert first != [deterministic_split(k, 0.2, seed=4) for k in keys]


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, "PNG")
    return buf.getvalue()


def _folder_with_bad_inputs(root):
    root.mkdir()
    for i, color in enumerate(["red", "green", "blue", "white", "black"]):
        (root / f"img{i}.png").write_bytes(_png(color))
        (root / f"img{i}.txt").write_text(f"a {color} square")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "corrupt.txt").write_text("broken")
    (root / "nocaption.png").write_bytes(_png("gray"))
    (root / "empty.png").write_bytes(_png("pink"))
    (root / "empty.txt").write_text("   ")
    (root / "latin1.png").write_bytes(_png("navy"))
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def test_build_from_folder_skips_and_counts_bad_pairs(tmp_path):
    src = _folder_with_bad_inputs(tmp_path / "src")
    stats = build_shards(src, tmp_path / "out", val_fraction=0.0, progress=False)
    assert stats["samples"] == 5
    assert stats["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "empty_caption": 1, "non_utf8_caption": 1}
    captions = sorted(s.caption for s in read_shard_samples(tmp_path / "out" / "train" / "train-000000.tar"))
    assert captions == sorted(f"a {c} square" for c in ["red", "green", "blue", "white", "black"])
    names = _tar_members(tmp_path / "out" / "train" / "train-000000.tar")
    assert len(names) == 15 and all(n.split(".")[1] in ("png", "txt", "json") for n in names)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_build_from_table(tmp_path, fmt):
    src = _folder_with_bad_inputs(tmp_path / "imgs")
    table = pd.DataFrame({
        "path": ["imgs/img0.png", "imgs/img1.png", "imgs/missing.png", "imgs/corrupt.jpg", str(src / "img2.png")],
        "text": ["red", "green", "ghost", "broken", None],
    })
    path = tmp_path / f"pairs.{fmt}"
    table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    stats = build_shards(path, tmp_path / "out", image_col="path", caption_col="text", val_fraction=0.0,
                         progress=False)
    assert stats["samples"] == 2
    assert stats["skipped"] == {"missing_image": 1, "corrupt_image": 1, "missing_caption": 1}


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="source not found"):
        build_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "t.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no usable samples"):
        build_shards(tmp_path / "t.csv", tmp_path / "out", progress=False)
    (tmp_path / "u.csv").write_text("file,caption\nx.png,hi\n")
    with pytest.raises(DataError, match="no column 'image'"):
        build_shards(tmp_path / "u.csv", tmp_path / "out", progress=False)
