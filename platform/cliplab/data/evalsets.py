"""Zero-shot classification eval sets, in CLIP_benchmark's webdataset layout.

    OUT/test-000000.tar, ...   {key}.png|jpg (the image) + {key}.cls (the class index, as text)
                               [+ {key}.json: optional metadata]
    OUT/classnames.txt         one class name per line; line i names class index i
    OUT/templates.txt          the set's own prompt templates, one per line, each with a {}
    OUT/stats.json             counts per class, shards, source

CLIP_benchmark keeps the tars in a ``test/`` folder beside ``classnames.txt`` and calls the
templates ``zeroshot_classification_templates.txt``; :func:`cliplab.eval.sets.open_eval_set` accepts
both. Builders here: :func:`build_fashion_mnist` (Debian's ``dataset-fashion-mnist``); the emoji
group set is :func:`cliplab.data.emoji.build_emoji_eval_set`.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cliplab.data.templates import FASHION, check_templates
from cliplab.errors import DataError

CLASSNAMES = "classnames.txt"
TEMPLATES = ("templates.txt", "zeroshot_classification_templates.txt")
PREFIX = "test"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Zalando's label order (class index i is line i of classnames.txt)
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot")


@dataclass
class ClassSample:
    """One labelled image as stored in a classification shard."""

    key: str
    image: bytes
    ext: str  # png | jpg
    cls: int
    meta: dict[str, Any] = field(default_factory=dict)


def write_classification_set(samples: Iterable[ClassSample], out_dir: str | Path, classnames: Sequence[str],
                             templates: Sequence[str], *, samples_per_shard: int = 1000,
                             extra_stats: dict | None = None) -> dict[str, Any]:
    """Write ``samples`` into ``out_dir/test-{000000..}.tar`` with ``classnames.txt``,
    ``templates.txt`` and ``stats.json`` beside them; returns the stats. Shards of an earlier
    build are removed first; tar members get a fixed mtime and mode (reproducible bytes)."""
    out = Path(out_dir)
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    check_templates(list(templates), "templates")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").unlink(missing_ok=True)
    stale = re.compile(re.escape(PREFIX) + r"-\d{6}\.tar")
    for old in out.iterdir():
        if stale.fullmatch(old.name):
            old.unlink()
    shards: list[str] = []
    counts: Counter = Counter()
    tar = None
    n = 0
    try:
        for s in samples:
            if not 0 <= s.cls < len(classnames):
                raise DataError(f"sample {s.key}: class index {s.cls} outside 0..{len(classnames) - 1}")
            if n % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                shards.append(f"{PREFIX}-{len(shards):06d}.tar")
                tar = tarfile.open(out / shards[-1], "w", format=tarfile.USTAR_FORMAT)
            members = [(s.ext, s.image), ("cls", str(s.cls).encode())]
            if s.meta:
                members.append(("json", json.dumps({"key": s.key, **s.meta}, ensure_ascii=False).encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            counts[s.cls] += 1
            n += 1
    finally:
        if tar is not None:
            tar.close()
    if n == 0:
        raise DataError(f"no samples to write into {out}")
    (out / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    (out / TEMPLATES[0]).write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
    stats = {"kind": "classification", "samples": n, "shards": shards, "num_classes": len(classnames),
             "per_class": {classnames[c]: counts[c] for c in range(len(classnames))}, **(extra_stats or {})}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def read_classnames(text: str, source: str) -> list[str]:
    """Class names from a ``classnames.txt`` body (one per line; blank lines are an error)."""
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise DataError(f"{source}: write one non-empty class name per line (line i names class index i)")
    return names


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not) as a uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _png(pixels: np.ndarray, image_px: int | None) -> bytes:
    from PIL import Image

    im = Image.fromarray(pixels, mode="L")
    if image_px and image_px != im.width:
        im = im.resize((image_px, image_px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def build_fashion_mnist(out_dir: str | Path, *, source: str | Path = FASHION_MNIST_DIR, split: str = "test",
                        limit: int | None = None, image_px: int | None = None, samples_per_shard: int = 2000,
                        progress: bool = True) -> dict[str, Any]:
    """Fashion-MNIST (Xiao et al. 2017; Debian's ``dataset-fashion-mnist``) as a zero-shot set:
    the ``split`` ("test": 10,000 images, or "train": 60,000) as grayscale PNGs, 28 px or
    upscaled to ``image_px``, keys ``fmnist-{split}-{index:05d}``; ``limit`` keeps the first
    images (the test split is already shuffled). Classnames in Zalando's label order and the
    :data:`cliplab.data.templates.FASHION` prompts are written beside the shards."""
    from tqdm import tqdm

    prefix = {"test": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split must be test or train, got {split!r}")
    source = Path(source)
    images_path = source / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = source / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(f"Fashion-MNIST not found in {source}: install Debian's dataset-fashion-mnist "
                        "(apt-get install dataset-fashion-mnist; `make setup` does it) or pass --source")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    n = min(len(images), limit) if limit else len(images)
    samples = (ClassSample(f"fmnist-{split}-{i:05d}", _png(images[i], image_px), "png", int(labels[i]))
               for i in tqdm(range(n), desc="writing Fashion-MNIST", unit="img", disable=not progress))
    return write_classification_set(samples, out_dir, FASHION_MNIST_CLASSES, FASHION,
                                    samples_per_shard=samples_per_shard,
                                    extra_stats={"source": f"Fashion-MNIST {split} ({source})",
                                                 "image_px": image_px or 28})
