"""`cliplab data build --upload` and `cliplab data inspect`, against the real S3 server."""

import json
import os

import pytest
from PIL import Image

from netfaults import CuttingProxy
from test_data_faults import build_faulty_shards

pytestmark = [pytest.mark.s3]


def test_build_uploads_and_inspect_reads_it_back_from_s3(tmp_path, s3_server, emoji_on_s3, capsys):
    from cliplab.cli.main import main

    src = tmp_path / "src"
    src.mkdir()
    for i, side in enumerate((40, 100, 300, 700)):
        Image.new("RGB", (side, side // 2), (i * 50, 90, 200)).save(src / f"img{i}.jpg")
        (src / f"img{i}.txt").write_text(f"a wide picture number {i}")
    assert main(["data", "build", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0",
                 "--samples-per-shard", "2", "--upload", "s3://cliplab/built", "--endpoint-url",
                 s3_server.endpoint]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 samples" in out and "uploaded 3 files to s3://cliplab/built/" in out  # 2 train shards + stats.json

    assert main(["data", "inspect", "s3://cliplab/built/train/", "--json", "--endpoint-url", s3_server.endpoint]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 4 and report["shards"] == 2 and report["skipped"] == {}
    assert report["image_size_histogram"] == {"0-63px": 1, "64-127px": 1, "128-255px": 0, "256-511px": 1,
                                              "512-1023px": 1, "1024-2047px": 0, ">=2048px": 0}
    assert report["caption_words"]["min"] == report["caption_words"]["max"] == 5
    assert len(report["examples"]) == 3 and report["examples"][0]["shard"].startswith("s3://cliplab/built/train/")


def test_an_upload_cut_off_mid_request_fails_loudly_and_names_the_file(tmp_path, s3_server, capsys, monkeypatch):
    """pyarrow's copy_files only logs a failed part upload and returns; a lost shard must be an error."""
    from cliplab.cli.main import main

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "shards"
    src.mkdir()
    for name in ("a.tar", "b.tar", "c.tar"):
        (src / name).write_bytes(os.urandom(300_000))
    with CuttingProxy(s3_server.port, b"PUT /cliplab/cut/b.tar") as proxy:
        code = main(["data", "upload", str(src), "s3://cliplab/cut", "--endpoint-url", proxy.endpoint])
    err = capsys.readouterr().err
    assert proxy.cuts >= 1 and code == 2, err
    assert "dropped or stalled a transfer under s3://cliplab/cut" in err and "b.tar" in err
    listing = s3_server.client().list_objects_v2(Bucket="cliplab", Prefix="cut/")
    assert "cut/b.tar" not in {o["Key"] for o in listing.get("Contents", [])}

    assert main(["data", "upload", str(src), "s3://cliplab/cut", "--endpoint-url", s3_server.endpoint]) == 0
    listing = s3_server.client().list_objects_v2(Bucket="cliplab", Prefix="cut/")
    assert {o["Key"]: o["Size"] for o in listing["Contents"]} == {f"cut/{n}": 300_000 for n in ("a.tar", "b.tar", "c.tar")}


def test_inspect_counts_bad_samples_by_reason(tmp_path, capsys):
    from cliplab.cli.main import main

    assert main(["data", "inspect", str(build_faulty_shards(tmp_path / "f")), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "67 samples in 3 shards" in out
    for reason in ("corrupt_image 1", "truncated_image 1", "decompression_bomb 1", "empty_file 1", "missing_caption 1",
                   "non_utf8_caption 1", "truncated_tar 1", "unreadable_shard 1"):
        assert reason in out
    assert "image size (longer side):" in out and "caption chars:" in out


def test_data_commands_have_help(capsys):
    from cliplab.cli.main import main

    for command in ("build", "inspect", "upload"):
        with pytest.raises(SystemExit):
            main(["data", command, "--help"])
        assert "usage: cliplab data " + command in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [
    ("When uploading part for key 'p/b.tar' in bucket 'b': AWS Error NETWORK_CONNECTION during UploadPart operation: "
     "curlCode: 52, Server returned nothing (no headers, no data)", "dropped or stalled a transfer under s3://b/p"),
    ("When uploading part for key 'p/b.tar' in bucket 'b': AWS Error ACCESS_DENIED during UploadPart operation",
     "S3 rejected the credentials for s3://b/p"),
    ("When listing objects under key 'p' in bucket 'b': AWS Error NETWORK_CONNECTION during ListObjectsV2 "
     "operation: curlCode: 7, Couldn't connect to server", "cannot reach the S3 endpoint"),
])
def test_s3_errors_are_explained_by_what_went_wrong(text, expected):
    """pyarrow's messages, as SeaweedFS and curl produce them: a transfer the server dropped, a
    credential refused mid-upload (not a network fault), and a server that is not there."""
    from cliplab.data.sources import explain_s3_error

    assert expected in explain_s3_error(OSError(text), "s3://b/p", "b", "http://127.0.0.1:9")
