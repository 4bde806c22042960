"""Bad data never stops training: every kind is skipped, counted by reason and logged to MLflow.

Shards are written by hand with tarfile: good samples beside a corrupt image, a truncated image,
a decompression bomb, a missing caption, a non-UTF-8 caption and a 0-byte file; a tar cut in the
middle of a member; and a "shard" that is not a tar at all."""

import io
import json
import struct
import tarfile
import zlib

import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import experiment

GOOD_MAIN, GOOD_TRUNCATED_TAR = 60, 7  # usable samples in the main shard / before the cut
EXPECTED = {"missing_caption": 1, "non_utf8_caption": 1, "empty_file": 1, "truncated_tar": 1,
            "unreadable_shard": 1, "corrupt_image": 1, "truncated_image": 1, "decompression_bomb": 1}


def _jpeg(i: int, side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header claiming side × side pixels (a 1-bit grey image, tiny IDAT)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(prefix: str, i: int):
    return f"{prefix}{i:05d}", {"jpg": _jpeg(i), "txt": f"colour swatch {i}".encode(),
                                "json": json.dumps({"group": f"g{i % 3}"}).encode()}


def build_faulty_shards(out):
    out.mkdir(parents=True, exist_ok=True)
    jpeg = _jpeg(7)
    bad = [
        ("bad-corrupt", {"jpg": b"\xff\xd8 this is not a jpeg at all" * 10, "txt": b"corrupt"}),
        ("bad-truncimg", {"jpg": jpeg[: len(jpeg) // 2], "txt": b"truncated image"}),
        ("bad-bomb", {"png": _bomb_png(), "txt": b"bomb"}),
        ("bad-nocaption", {"jpg": jpeg}),
        ("bad-nonutf8", {"jpg": jpeg, "txt": b"caf\xe9 \xff\xfe"}),
        ("bad-zerobyte", {"jpg": b"", "txt": b"empty image file"}),
    ]
    samples = [_good("a", i) for i in range(GOOD_MAIN)]
    for j, sample in enumerate(bad):  # spread the bad ones through the shard
        samples.insert(5 + 9 * j, sample)
    _tar(out / "faulty-000000.tar", samples)
    _tar(out / "faulty-000001.tar", [_good("b", i) for i in range(10)])
    whole = (out / "faulty-000001.tar").read_bytes()
    with tarfile.open(out / "faulty-000001.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == f"b{GOOD_TRUNCATED_TAR:05d}.jpg").offset_data + 100
    (out / "faulty-000001.tar").write_bytes(whole[:cut])
    (out / "faulty-000002.tar").write_bytes(b"definitely not a tar archive\n" * 40)
    return out


def test_index_and_decode_count_every_bad_kind(tmp_path):
    from cliplab.config import S3Config
    from cliplab.data import plan
    from cliplab.data.index import INDEX_REASONS, build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.data.stream import ROW_REASONS, read_decode

    shards = resolve_shards(str(build_faulty_shards(tmp_path / "faulty")), S3Config())
    index = build_train_index([("faulty", 1.0, shards)])
    assert index.skipped() == {k: v for k, v in EXPECTED.items() if k in INDEX_REASONS}
    assert int(index.counts().sum()) == GOOD_MAIN + GOOD_TRUNCATED_TAR + 3
    p = plan.rank_plan(index, seed=0, epoch=0, world=1, rank=0, window=1000)
    blocks = list(read_decode({"spec": [json.dumps(plan.read_spec(index, p, 0, len(p)))]},
                              model_name="cliplab-tiny", s3="{}"))
    reasons = {}
    for b in blocks:
        for key, code in zip(b["key"], b["skip"], strict=True):
            if code:
                reasons[ROW_REASONS[code]] = key
    assert reasons == {"corrupt_image": "bad-corrupt", "truncated_image": "bad-truncimg",
                       "decompression_bomb": "bad-bomb"}


def test_a_source_with_no_readable_sample_is_an_error(tmp_path):
    from cliplab.config import S3Config
    from cliplab.data.index import build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.errors import DataError

    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    _tar(tmp_path / "y.tar", [("k", {"jpg": _jpeg(1)})])
    with pytest.raises(DataError, match="no readable samples.*unreadable_shard.: 1.*missing_caption.: 1"):
        build_train_index([("broken", 1.0, resolve_shards(str(tmp_path), S3Config()))])


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.mlflow
def test_training_on_faulty_shards_completes_and_logs_exact_skip_counts(tmp_path, s3_server, mlflow_server,
                                                                          ray_cluster, monkeypatch):
    from cliplab.config import S3Config
    from cliplab.data.sources import upload
    from cliplab.train.launch import run_training

    monkeypatch.setenv("CLIPLAB_INDEX_CACHE", str(tmp_path / "index-cache"))
    upload(build_faulty_shards(tmp_path / "faulty"), "s3://cliplab/faulty", S3Config(endpoint_url=s3_server.endpoint))
    cfg = experiment(tmp_path, s3_server, mlflow_server, **{
        "data.train": "s3://cliplab/faulty/", "data.val": None, "data.batch_size": 8, "data.shuffle_window": 16,
        "train.max_steps": None, "train.epochs": 1, "train.checkpoint_every": 100})
    result = run_training(cfg, name="faulty")
    assert result.error is None
    # 70 planned samples (67 good + 3 undecodable) = 35 per rank = 4 batches of 8
    assert result.metrics["step"] == 4
    metrics = MlflowClient(mlflow_server.uri).get_run(result.metrics["mlflow_run_id"]).data.metrics
    skipped = {k.removeprefix("data/skipped/"): v for k, v in metrics.items() if k.startswith("data/skipped/")}
    assert {k: v for k, v in skipped.items() if v and k != "total"} == EXPECTED
    assert skipped["total"] == sum(EXPECTED.values())
