"""Eval set builders (emoji groups, Fashion-MNIST) and the detection of an eval set's kind."""

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image
from pyarrow import fs

from cliplab.cli.main import main
from cliplab.data.evalsets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from cliplab.data.shards import deterministic_split
from cliplab.data.templates import EMOJI, FASHION, OPENAI_IMAGENET
from cliplab.errors import DataError
from cliplab.eval.sets import iter_shard, open_eval_set

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="Debian's dataset-fashion-mnist is not installed (make setup)")


def samples(folder: Path) -> list[tuple[str, dict]]:
    return [s for tar in sorted(folder.glob("*.tar")) for s in iter_shard(str(tar), fs.LocalFileSystem())]


@needs_fmnist
def test_fashion_mnist_with_limit_writes_the_first_test_images_and_their_classes(tmp_path, capsys):
    out = tmp_path / "fmnist"
    assert main(["data", "fashion-mnist", str(out), "--limit", "30", "--samples-per-shard", "20"]) == 0
    assert "30 images in 2 shards" in capsys.readouterr().out
    assert (out / "classnames.txt").read_text().splitlines() == list(FASHION_MNIST_CLASSES)
    assert (out / "templates.txt").read_text().splitlines() == list(FASHION)
    got = samples(out)
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:30]
    assert [k for k, _ in got] == [f"fmnist-test-{i:05d}" for i in range(30)]
    assert [int(f["cls"]) for _, f in got] == labels.tolist()
    image = Image.open(io.BytesIO(got[0][1]["png"]))
    assert image.size == (28, 28) and image.mode == "L"
    s = open_eval_set(str(out))
    assert s.kind == "classification" and s.classnames == list(FASHION_MNIST_CLASSES) and s.templates == list(FASHION)
    assert s.templates_source == "templates.txt" and len(s.shards.paths) == 2


def test_fashion_mnist_without_the_package_says_what_to_install(tmp_path, capsys):
    assert main(["data", "fashion-mnist", str(tmp_path / "o"), "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset-fashion-mnist" in err and len(err.splitlines()) == 1


def test_emoji_eval_set_has_group_classes_from_the_val_split(tmp_path, capsys):
    out = tmp_path / "emoji-eval"
    assert main(["data", "emoji", "--eval", str(out), "--limit", "18", "--image-px", "32", "--workers", "1"]) == 0
    assert "9 classes" in capsys.readouterr().out
    classnames = (out / "classnames.txt").read_text().splitlines()
    assert classnames[:2] == ["smileys & emotion", "people & body"] and len(classnames) == 9
    assert "component" not in classnames
    got = samples(out)
    assert len(got) == 18
    assert sorted(int(f["cls"]) for _, f in got) == sorted(list(range(9)) * 2)  # spread over the groups
    assert all(deterministic_split(k, 0.1, 0) == "val" for k, _ in got)  # never a training image
    import json

    meta = json.loads(got[0][1]["json"])
    assert classnames[int(got[0][1]["cls"])] == meta["group"].lower() and meta["subgroup"] and meta["name"]
    s = open_eval_set(str(out))
    assert s.kind == "classification" and s.templates == list(EMOJI)


def test_emoji_without_out_or_eval_is_a_one_line_error(capsys):
    assert main(["data", "emoji"]) == 2
    assert "--eval" in capsys.readouterr().err


def test_clip_benchmark_layout_and_training_layout_are_detected(tmp_path):
    from cliplab.data.evalsets import ClassSample, write_classification_set
    from cliplab.data.shards import Sample, write_split

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    root = tmp_path / "cb"
    write_classification_set([ClassSample(f"k{i}", png.getvalue(), "png", i % 2) for i in range(4)],
                             root / "test", ["cat", "dog"], ["a {}."])
    (root / "test" / "classnames.txt").rename(root / "classnames.txt")
    (root / "test" / "templates.txt").unlink()
    (root / "zeroshot_classification_templates.txt").write_text("# comment\na photo of a {}.\n\nitap of a {}.\n")
    for url in (str(root), str(root / "test")):  # the dataset folder or its test/ folder
        s = open_eval_set(url)
        assert s.kind == "classification" and s.classnames == ["cat", "dog"] and s.name == "cb-test"
        assert s.templates == ["a photo of a {}.", "itap of a {}."]
    (root / "zeroshot_classification_templates.txt").unlink()
    assert open_eval_set(str(root)).templates == list(OPENAI_IMAGENET)
    assert open_eval_set(str(root), templates="simple").templates[0] == "itap of a {}."

    write_split([Sample("a", png.getvalue(), "png", "a red square")], tmp_path / "corpus", "val")
    s = open_eval_set(str(tmp_path / "corpus"))  # a corpus folder: its val/ split
    assert s.kind == "retrieval" and s.name == "corpus-val"

    (root / "templates.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match="exactly one"):
        open_eval_set(str(root))
    with pytest.raises(DataError, match="point --data at a folder of .tar shards"):
        open_eval_set(str(tmp_path / "missing"))
    shutil.rmtree(root / "test")
