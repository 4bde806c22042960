"""The shard format (img2dataset layout) and the builders."""

import io
import json
import tarfile

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from cliplab.data.emoji import FONT, _render, build_emoji_corpus
from cliplab.data.shards import (
    Sample,
    ShardSink,
    build_from_folder,
    build_from_table,
    build_shards,
    deterministic_split,
    read_shard_samples,
    write_split,
)
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
    for split, info in stats["splits"].items():
        assert sum(stats["groups_by_split"][split].values()) == info["samples"]
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
    c = build_emoji_corpus(tmp_path / "a", limit=40, image_px=32, progress=False)  # rebuild, smaller
    assert sorted(p.name for p in (tmp_path / "a").glob("*/*.tar")) == sorted(
        name for info in c["splits"].values() for name in info["shards"])  # no stale shards left


def test_emoji_renders_keep_relative_size_and_reject_missing_glyphs():
    sizes = {}
    for name, char in [("large", "\u2b1b"), ("small", "\u25aa\ufe0f")]:
        img = Image.open(io.BytesIO(_render((char, None, str(FONT)))))
        sizes[name] = img.convert("L").point(lambda v: v < 250).getbbox()
    assert (sizes["small"][2] - sizes["small"][0]) < (sizes["large"][2] - sizes["large"][0]) / 2
    assert _render(("\U000E0FFF", 32, str(FONT))) is None  # unassigned: nothing drawn
    assert _render(("\U0001F600\U0001F600", 32, str(FONT))) is None  # two glyphs, not one emoji


def test_shard_sink_rolls_over_and_write_split_names_the_files(tmp_path):
    samples = [Sample(f"{i:09d}", _png("red"), "png", f"tile {i}", {"n": i}) for i in range(5)]
    info = write_split(samples, tmp_path, "train", samples_per_shard=2)
    assert info == {"samples": 5, "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]}
    back = [s for name in info["shards"] for s in read_shard_samples(tmp_path / "train" / name)]
    assert [(s.key, s.caption, s.meta["n"], s.image) for s in back] == [
        (s.key, s.caption, s.meta["n"], s.image) for s in samples]
    with ShardSink(tmp_path / "train", "train") as sink:  # a new build replaces the old shards
        sink.write(samples[0])
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train-000000.tar"]


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
    stats = build_from_folder(src, tmp_path / "out", val_fraction=0.0, progress=False)
    assert stats["samples"] == 5
    assert stats["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "empty_caption": 1, "non_utf8_caption": 1}
    captions = sorted(s.caption for s in read_shard_samples(tmp_path / "out" / "train" / "train-000000.tar"))
    assert captions == sorted(f"a {c} square" for c in ["red", "green", "blue", "white", "black"])
    names = _tar_members(tmp_path / "out" / "train" / "train-000000.tar")
    assert len(names) == 15 and all(n.split(".")[1] in ("png", "txt", "json") for n in names)
    first = next(read_shard_samples(tmp_path / "out" / "train" / "train-000000.tar"))
    assert first.image == (src / first.meta["source"]).read_bytes()  # original bytes, not re-encoded
    assert (first.meta["width"], first.meta["height"]) == (12, 12)
    assert stats == json.loads((tmp_path / "out" / "stats.json").read_text())


def test_folder_split_is_by_relative_path_so_new_files_do_not_move_old_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.png").write_bytes(_png((i, 0, 0)))
        (src / f"{i:03d}.txt").write_text(f"tile {i}")

    def splits(out):
        stats = build_from_folder(src, out, val_fraction=0.3, seed=1, progress=False)
        return {s.meta["source"]: split for split, info in stats["splits"].items()
                for name in info["shards"] for s in read_shard_samples(out / split / name)}

    before = splits(tmp_path / "a")
    assert splits(tmp_path / "b") == before and "val" in before.values()
    (src / "000-new.png").write_bytes(_png("white"))  # sorts first: shifts every key
    (src / "000-new.txt").write_text("a new tile")
    after = splits(tmp_path / "c")
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_build_from_table(tmp_path, fmt):
    src = _folder_with_bad_inputs(tmp_path / "imgs")
    table = pd.DataFrame({
        "path": ["imgs/img0.png", "imgs/img1.png", "imgs/missing.png", "imgs/corrupt.jpg", str(src / "img2.png")],
        "text": ["red", "green", "ghost", "broken", None],
    })
    path = tmp_path / f"pairs.{fmt}"
    table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    stats = build_from_table(path, tmp_path / "out", image_col="path", caption_col="text", val_fraction=0.0,
                             progress=False)
    assert stats["samples"] == 2
    assert stats["skipped"] == {"missing_image": 1, "corrupt_image": 1, "missing_caption": 1}
    assert build_shards(path, tmp_path / "out2", image_col="path", caption_col="text",
                        progress=False)["samples"] == 2


def test_table_captions_are_text_as_written(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "t.csv").write_text("image,caption\na.png,NA\na.png,2024\na.png,\n")
    stats = build_from_table(tmp_path / "t.csv", tmp_path / "out", val_fraction=0.0, progress=False)
    captions = [s.caption for s in read_shard_samples(tmp_path / "out" / "train" / "train-000000.tar")]
    assert captions == ["NA", "2024"] and stats["skipped"] == {"missing_caption": 1}
    pd.DataFrame({"image": ["a.png", "a.png"], "caption": [b"caf\xc3\xa9", b"caf\xe9"]}).to_parquet(tmp_path / "b.parquet")
    stats = build_from_table(tmp_path / "b.parquet", tmp_path / "out", val_fraction=0.0, progress=False)
    assert next(read_shard_samples(tmp_path / "out" / "train" / "train-000000.tar")).caption == "café"
    assert stats["skipped"] == {"non_utf8_caption": 1}


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="source not found"):
        build_shards(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DataError, match="source not found"):
        build_from_folder(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DataError, match="source not found"):
        build_from_table(tmp_path / "nope.csv", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable samples"):
        build_from_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "t.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no usable samples"):
        build_shards(tmp_path / "t.csv", tmp_path / "out", progress=False)
    (tmp_path / "u.csv").write_text("file,caption\nx.png,hi\n")
    with pytest.raises(DataError, match="no column 'image'"):
        build_shards(tmp_path / "u.csv", tmp_path / "out", progress=False)


def test_data_cli_builds_and_summarises(tmp_path, capsys):
    import argparse

    from cliplab.cli import data_cmd

    parser = argparse.ArgumentParser(prog="cliplab")
    data_cmd.register(parser.add_subparsers(dest="command", required=True))
    src = _folder_with_bad_inputs(tmp_path / "src")
    args = parser.parse_args(["data", "build", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.5",
                              "--samples-per-shard", "2", "--workers", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 samples" in printed and "corrupt_image 1" in printed and str(tmp_path / "out" / "train") in printed
    args = parser.parse_args(["data", "emoji", "--out", str(tmp_path / "e"), "--image-px", "16", "--workers", "1"])
    assert (args.image_px, args.workers, args.val_fraction, args.func) == (16, 1, 0.1, data_cmd.run_emoji)
