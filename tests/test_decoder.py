"""One sample decoder for training, val, eval and inspect: the same skip reasons and counts on the
same shards; member caps that hold under a memory limit (a GNU-sparse member, a 10 MB caption, a
member that declares 8 GiB); a bounded inspect report; quiet decoding of palette PNGs."""

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pyarrow import fs

from test_data_faults import EXPECTED, _jpeg, _tar, build_faulty_shards

HEADROOM = 160 << 20  # address space the child may still take once warmed up: less than the 256 MiB member


# -- hostile shards ------------------------------------------------------------------------------

def _good(key: str, i: int) -> dict[str, bytes]:
    return {"jpg": _jpeg(i), "txt": f"swatch {key}".encode()}


def _write_members(folder: Path, samples) -> list[str]:
    names = []
    for key, files in samples:
        for ext, data in files.items():
            (folder / f"{key}.{ext}").write_bytes(data)
            names.append(f"{key}.{ext}")
    return names


def build_hostile_shards(out: Path) -> Path:
    """``sparse.tar``: a GNU-sparse 256 MiB caption (about 10 KB on disk) between two good samples;
    ``caption.tar``: a 10 MB caption between two good samples; ``huge.tar``: a good sample, then
    a jpg member whose header declares 8 GiB, and the file ends."""
    out.mkdir(parents=True)
    src = out / "src"
    src.mkdir()
    names = _write_members(src, [("g0", _good("g0", 0)), ("s0", {"jpg": _jpeg(1)})])
    with open(src / "s0.txt", "wb") as f:
        f.truncate(256 << 20)  # a hole: no data blocks
    names += ["s0.txt", *_write_members(src, [("g1", _good("g1", 2))])]
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(out / "sparse.tar"), "-C", str(src), *names],
                   check=True)
    for name in os.listdir(src):
        os.unlink(src / name)
    src.rmdir()
    assert (out / "sparse.tar").stat().st_size < 64 << 10
    _tar(out / "caption.tar", [("c0", _good("c0", 3)), ("c1", {"jpg": _jpeg(4), "txt": b"a" * 10_000_000}),
                               ("c2", _good("c2", 5))])
    header = tarfile.TarInfo("h1.jpg")
    header.size = 8 << 30  # base-256 in the GNU format
    members = [_member(f"h0.{ext}", data) for ext, data in _good("h0", 6).items()] + [_member("h1.txt", b"a bomb")]
    (out / "huge.tar").write_bytes(b"".join(members) + header.tobuf(tarfile.GNU_FORMAT) + b"\xff" * 2048)
    return out


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def _sample_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Each key's byte range: its first header up to the next key's first header (or the file's end)."""
    starts: dict[str, int] = {}
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for member in tar:
                starts.setdefault(member.name.split(".")[0], member.offset)
        except tarfile.TarError:
            pass
    keys = list(starts)
    ends = [starts[k] for k in keys[1:]] + [path.stat().st_size]
    return {k: (starts[k], e) for k, e in zip(keys, ends, strict=True)}


# -- the memory-limited child --------------------------------------------------------------------

def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _stream_reasons(path: Path, ranges: dict[str, tuple[int, int]]) -> dict[str, str]:
    from cliplab.data.stream import ROW_REASONS, read_decode

    rows = [[pos, 0, *ranges[k]] for pos, k in enumerate(sorted(ranges))]
    spec = {"rows": rows, "shards": {"0": [str(path), False, str(path)]}}
    blocks = list(read_decode({"spec": [json.dumps(spec)]}, model_name="cliplab-tiny", s3="{}"))
    codes = [int(c) for b in blocks for c in b["skip"]]
    return {k: ROW_REASONS[c] for k, c in zip(sorted(ranges), codes, strict=True)}


def _read_everything(folder: Path, ranges: dict) -> dict:
    from cliplab.data.index import scan_shard
    from cliplab.data.inspect import inspect_shard

    local = fs.LocalFileSystem()
    out = {}
    for name in sorted(ranges):
        path = str(folder / name)
        index = scan_shard(path, local)
        shown = inspect_shard(path, local, path, 1)
        out[name] = {"index": index.skipped, "indexed": len(index),
                     "inspect": dict(shown["skipped"]), "inspected": shown["samples"],
                     "stream": _stream_reasons(folder / name, ranges[name])}
    return out


def child(folder: str, ranges_json: str) -> None:
    """Warm up on good shards, cap the address space at the current size + :data:`HEADROOM`,
    check the cap bites, then read the hostile shards through index, stream and inspect."""
    import torch

    torch.set_num_threads(1)
    ranges = json.loads(Path(ranges_json).read_text())
    _read_everything(Path(folder) / "warm", {"warm.tar": ranges.pop("warm.tar")})
    limit = _vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        bytearray(HEADROOM + (64 << 20))
        print("the address-space limit did not bite", file=sys.stderr)
        sys.exit(3)
    except MemoryError:
        pass
    print("RESULT " + json.dumps(_read_everything(Path(folder), ranges)))


# -- tests ---------------------------------------------------------------------------------------

def test_sparse_huge_caption_and_8gib_members_are_skipped_as_oversized_under_a_memory_limit(tmp_path):
    folder = build_hostile_shards(tmp_path / "hostile")
    (folder / "warm").mkdir()
    _tar(folder / "warm" / "warm.tar", [(f"w{i}", _good(f"w{i}", i)) for i in range(3)])
    ranges = {name: _sample_ranges(folder / name) for name in ("sparse.tar", "caption.tar", "huge.tar")}
    ranges["warm.tar"] = _sample_ranges(folder / "warm" / "warm.tar")
    (tmp_path / "ranges.json").write_text(json.dumps(ranges))
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__, str(folder), str(tmp_path / "ranges.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert {n: (g["index"], g["indexed"]) for n, g in got.items()} == {
        "sparse.tar": ({"oversized_member": 1}, 2), "caption.tar": ({"oversized_member": 1}, 2),
        "huge.tar": ({"oversized_member": 1, "truncated_tar": 1}, 1)}
    assert {n: (g["inspect"], g["inspected"]) for n, g in got.items()} == \
           {n: (g["index"], g["indexed"]) for n, g in got.items()}
    assert got["sparse.tar"]["stream"] == {"g0": "ok", "s0": "oversized_member", "g1": "ok"}
    assert got["caption.tar"]["stream"] == {"c0": "ok", "c1": "oversized_member", "c2": "ok"}
    assert got["huge.tar"]["stream"] == {"h0": "ok", "h1": "oversized_member"}


def test_index_ranges_after_a_sparse_member_read_back_the_next_sample(tmp_path):
    """A sparse member's range ends at its stored blocks, so the sample after it is readable."""
    from cliplab.config import S3Config
    from cliplab.data import plan
    from cliplab.data.index import build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.data.stream import read_decode

    folder = build_hostile_shards(tmp_path / "hostile")
    index = build_train_index([("s", 1.0, resolve_shards(str(folder / "sparse.tar"), S3Config()))])
    p = plan.rank_plan(index, seed=0, epoch=0, world=1, rank=0, window=100)
    blocks = list(read_decode({"spec": [json.dumps(plan.read_spec(index, p, 0, len(p)))]},
                              model_name="cliplab-tiny", s3="{}"))
    assert sorted(k for b in blocks for k in b["key"]) == ["g0", "g1"]
    assert all((b["skip"] == 0).all() for b in blocks)


def _eval_skips(folder: Path) -> Counter:
    from cliplab.config import ModelConfig
    from cliplab.eval.embedding import encode_piece
    from cliplab.models import build_model

    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    bundle.model.eval()
    total: Counter = Counter()
    for tar in sorted(folder.glob("*.tar")):
        out = encode_piece(bundle.model, bundle.val_transform, bundle.tokenizer, str(tar), fs.LocalFileSystem(),
                           "retrieval")
        total.update(out["skipped"])
    return total


def _val_skips(folder: Path) -> Counter:
    from cliplab.data.pipeline import read_val_shard

    paths = np.array([str(p) for p in sorted(folder.glob("*.tar"))], dtype=object)
    total: Counter = Counter()
    for block in read_val_shard({"path": paths}, filesystem=fs.LocalFileSystem(), prefix="",
                                model_name="cliplab-tiny", label_key="group", limits=_limits()):
        total.update(str(r) for r in block["skip"] if r)
    return total


def _limits():
    from cliplab.data.decode import Limits

    return Limits()


def _train_skips(folder: Path) -> Counter:
    from cliplab.config import S3Config
    from cliplab.data import plan
    from cliplab.data.index import build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.data.stream import ROW_REASONS, read_decode

    index = build_train_index([("f", 1.0, resolve_shards(str(folder), S3Config()))])
    total = Counter(index.skipped())
    p = plan.rank_plan(index, seed=0, epoch=0, world=1, rank=0, window=1000)
    for b in read_decode({"spec": [json.dumps(plan.read_spec(index, p, 0, len(p)))]},
                         model_name="cliplab-tiny", s3="{}"):
        total.update(ROW_REASONS[int(c)] for c in b["skip"] if c)
    return total


def _inspect_skips(folder: Path) -> Counter:
    from cliplab.config import S3Config
    from cliplab.data.inspect import inspect_shards
    from cliplab.data.sources import resolve_shards

    return Counter(inspect_shards(resolve_shards(str(folder), S3Config()), progress=False)["skipped"])


def test_training_val_eval_and_inspect_skip_the_same_samples_for_the_same_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLAB_INDEX_CACHE", str(tmp_path / "cache"))
    folder = build_faulty_shards(tmp_path / "faulty")
    _tar(folder / "faulty-000003.tar", [("big", {"jpg": _jpeg(1), "txt": b"b" * (2 << 20)})])
    expected = {**EXPECTED, "oversized_member": 1}
    assert _train_skips(folder) == expected
    assert _val_skips(folder) == expected
    assert _eval_skips(folder) == expected
    assert _inspect_skips(folder) == expected


def test_caption_embedding_reads_the_training_keys_through_the_shared_decoder(tmp_path):
    from cliplab.data.captions import read_captions
    from test_data_faults import GOOD_MAIN, GOOD_TRUNCATED_TAR

    folder = build_faulty_shards(tmp_path / "faulty")
    _tar(folder / "faulty-000003.tar", [("big", {"jpg": _jpeg(1), "txt": b"b" * (2 << 20)}), ("ok", _good("ok", 2))])
    paths = np.array([str(p) for p in sorted(folder.glob("*.tar"))], dtype=object)
    got = read_captions({"path": paths}, filesystem=fs.LocalFileSystem(), limits=_limits())
    keys = list(got["__key__"])
    # what the training index keeps: the good samples and the three whose images fail only at decode
    assert len(keys) == len(set(keys)) == GOOD_MAIN + 3 + GOOD_TRUNCATED_TAR + 1
    assert set(keys) == {f"a{i:05d}" for i in range(GOOD_MAIN)} | {f"b{i:05d}" for i in range(GOOD_TRUNCATED_TAR)} \
        | {"bad-corrupt", "bad-truncimg", "bad-bomb", "ok"}
    assert dict(zip(keys, got["txt"], strict=True))["a00007"] == "colour swatch 7"


def test_eval_skips_non_utf8_captions_and_decompression_bombs_as_training_does(tmp_path):
    from test_data_faults import _bomb_png

    folder = tmp_path / "evalset"
    folder.mkdir()
    _tar(folder / "e-000000.tar", [("a", _good("a", 1)), ("b", {"jpg": _jpeg(2), "txt": b"caf\xe9 \xff"}),
                                   ("c", {"png": _bomb_png(), "txt": b"bomb"}), ("d", _good("d", 3))])
    assert _eval_skips(folder) == {"non_utf8_caption": 1, "decompression_bomb": 1}


def test_inspect_report_is_bounded(tmp_path, capsys):
    from cliplab.cli.main import main
    from cliplab.data.inspect import CAPTION_CHARS, MAX_EXAMPLES

    folder = tmp_path / "long"
    folder.mkdir()
    _tar(folder / "l-000000.tar", [(f"k{i}", {"jpg": _jpeg(i), "txt": ("word " * 100_000).encode()})
                                   for i in range(MAX_EXAMPLES + 10)])
    assert main(["data", "inspect", str(folder), "--json", "--examples", "1000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == MAX_EXAMPLES + 10 and len(report["examples"]) == MAX_EXAMPLES
    assert max(len(e["caption"]) for e in report["examples"]) == CAPTION_CHARS
    assert main(["data", "inspect", str(folder), "--examples", "1000"]) == 0
    text = capsys.readouterr().out
    assert len(text) < (MAX_EXAMPLES + 20) * (CAPTION_CHARS + 100)  # the captions alone are 30 MB
    assert main(["data", "inspect", str(folder), "--max-text-bytes", "1000"]) == 0
    assert "oversized_member 60" in capsys.readouterr().out


def test_member_caps_are_validated():
    from cliplab.config import ExperimentConfig, validate, with_overrides
    from cliplab.errors import ConfigError

    cfg = with_overrides(ExperimentConfig(), {"data.train": "x", "data.max_text_bytes": 0})
    with pytest.raises(ConfigError, match="data.max_image_bytes and data.max_text_bytes must be >= 1"):
        validate(cfg)


def _palette_png_with_byte_transparency() -> bytes:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([200, 10, 20, 30, 180, 40, 0, 0, 0] + [0] * (256 * 3 - 9))
    im.putpixel((1, 1), 1)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=bytes([0, 128, 255]))
    return buf.getvalue()


def test_palette_images_with_transparency_decode_without_pil_warnings():
    from cliplab.data.decode import load_rgb

    raw = _palette_png_with_byte_transparency()
    with Image.open(io.BytesIO(raw)) as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb, problem = load_rgb(raw)
    assert problem is None
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (200, 10, 20) and rgb.getpixel((1, 1)) == (30, 180, 40)


CAPTION_PLAN = """
import sys
import ray
from cliplab.config import S3Config
from cliplab.data.captions import CaptionEncoder, caption_dataset
from cliplab.data.sources import resolve_shards
ray.init(address=sys.argv[1], logging_level="WARNING")
ds = caption_dataset(resolve_shards(sys.argv[2], S3Config()), concurrency=1)
print("PLAN BUILT", file=sys.stderr, flush=True)
ds.map_batches(CaptionEncoder, concurrency=1)  # the deprecated argument: shows the warning is seen
"""


@pytest.mark.ray
def test_caption_embedding_dataset_uses_no_deprecated_ray_argument(emoji_corpus, ray_cluster):
    """In a fresh driver (Ray Data logs to stderr; an earlier test in this process may have
    reconfigured its logger)."""
    run = subprocess.run([sys.executable, "-c", CAPTION_PLAN, ray_cluster.address, str(emoji_corpus[0] / "val")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, control = run.stderr.split("PLAN BUILT")
    warning = "``concurrency`` is deprecated"
    assert warning not in ours and warning in control


def _cut_copy(src: Path, dst: Path) -> None:
    """``src`` cut in the middle of its fourth member's data (no end marker)."""
    with tarfile.open(src) as tar:
        member = tar.getmembers()[3]
    dst.write_bytes(src.read_bytes()[:member.offset_data + member.size // 2])


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_a_truncated_val_shard_is_skipped_and_counted_and_the_final_eval_still_happens(
        tmp_path, s3_server, mlflow_server, ray_cluster, emoji_corpus):
    import shutil

    from cliplab.data.index import scan_shard
    from cliplab.train.launch import run_training
    from conftest import experiment

    val = tmp_path / "val"
    shutil.copytree(emoji_corpus[0] / "val", val)
    _cut_copy(sorted(val.glob("*.tar"))[0], val / "val-000099.tar")
    kept = len(scan_shard(str(val / "val-000099.tar"), fs.LocalFileSystem()))  # the samples before the cut
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "data.val": str(val), "train.max_steps": 2, "train.checkpoint_every": 100, "train.max_failures": 0})
    result = run_training(cfg, name="bad-val")
    assert result.error is None
    metrics = result.metrics
    assert metrics["val/skipped/truncated_tar"] == 1 and metrics["val/skipped/total"] == 1
    assert metrics["val/num_samples"] == emoji_corpus[1]["splits"]["val"]["samples"] + kept


if __name__ == "__main__":
    child(*sys.argv[1:])
