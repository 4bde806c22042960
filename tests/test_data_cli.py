"""`cliplab data build --upload` and `cliplab data inspect`, against the real S3 server."""

import json

import pytest
from PIL import Image

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
