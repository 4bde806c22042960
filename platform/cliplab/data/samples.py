"""Training samples from read specs: read by byte range, decoded, augmented and tokenized.

:func:`read_decode` turns read specs (:func:`~cliplab.data.plan.read_spec`: one shuffle window's
rows ``[pos, shard, start, end]`` and the shards' paths) into blocks of rows in position order:
``pos, key, skip, image`` (uint8 H×W×C; normalised on the device), ``text`` (tokens) and, for
X-CLR, ``image_2`` and ``caption_embedding``. A bad sample is a flagged row (``skip`` > 0), never
an error. It runs in a Ray Data task or in the worker's decode thread
(:func:`cliplab.data.stream.worker_blocks`); both give the same rows. Each sample's crop is drawn
by :class:`SeededAugment`, so it depends only on the data seed, the epoch and the sample.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from cliplab.data.captions import caption_table
from cliplab.data.decode import Limits, ShardFault, Skip, check_group, decode_sample, parse_sample
from cliplab.data.index import REASONS, read_ranges
from cliplab.models import preprocessing

log = logging.getLogger(__name__)

ROW_REASONS = ("ok", *REASONS)  # a row's skip code → reason
_CODE = {r: i for i, r in enumerate(ROW_REASONS)}
OUT_ROWS = 64  # rows per emitted block


@lru_cache(maxsize=4)
def _split_transform(model_name: str):
    """open_clip's train transform without ToTensor/Normalize (→ uint8 HWC, see :class:`SeededAugment`),
    its mean/std, image side and tokenizer."""
    transform, tokenizer = preprocessing(model_name, train=True)
    steps = list(transform.transforms)
    normalize = steps[-1]
    if not type(normalize).__name__.endswith("Normalize") or not type(steps[-2]).__name__.endswith("ToTensor"):
        raise ValueError(f"unexpected open_clip train transform for {model_name}: {transform}")
    size = next(t.size for t in steps if hasattr(t, "size"))
    side = size[0] if isinstance(size, (tuple, list)) else size
    return SeededAugment(tuple(steps[:-2])), tuple(normalize.mean), tuple(normalize.std), int(side), tokenizer


class SeededAugment:
    """open_clip's train augmentation with its randomness drawn from a NumPy generator per sample.

    torchvision's ``RandomResizedCrop`` draws from torch's global generator, which differs per Ray
    task process and, in the worker's own decode thread, would be shared with training: the same
    seed gave other crops on every run. Here the crop is drawn from ``rng`` (seeded by the data seed,
    the epoch and the sample's place in its shard, so a sample's crop does not depend on the world
    size, the rank or where it was decoded) by torchvision's own rule; every other step runs as is."""

    def __init__(self, steps: tuple) -> None:
        self.steps = steps
        self.size = next((getattr(t, "size", None) for t in steps if hasattr(t, "size")), None)

    def __call__(self, image, rng: np.random.Generator):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F

        for t in self.steps:
            if isinstance(t, RandomResizedCrop):
                top, left, h, w = _crop_params(image.size, t.scale, t.ratio, rng)
                image = F.resized_crop(image, top, left, h, w, t.size, t.interpolation, antialias=t.antialias)
            else:
                image = t(image)
        return image


def _crop_params(size: tuple[int, int], scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (torchvision's rule: ten tries, then a centre crop) on ``rng``."""
    import math

    width, height = size
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@lru_cache(maxsize=4)
def _filesystem(s3_json: str | None):
    from pyarrow import fs

    if s3_json is None:
        return fs.LocalFileSystem()
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem

    return s3_filesystem(S3Config(**json.loads(s3_json)))


def read_decode(batch: dict[str, np.ndarray], *, model_name: str, s3: str, views: int = 1,
                captions_ref=None, limits: Limits = Limits()) -> Iterator[dict[str, np.ndarray]]:
    """For each read spec (one shuffle window) read, decode, augment and tokenize the samples, in
    position order: a Ray Data task, or the worker's own decode thread (:func:`worker_blocks`). Bad
    samples come out as rows with ``skip > 0`` and zeros. ``spec["aug"]`` (``[seed, epoch]``) seeds
    each sample's augmentation."""
    pre, _mean, _std, side, tokenizer = _split_transform(model_name)
    table = caption_table(captions_ref)
    for spec_json in batch["spec"]:
        spec = json.loads(spec_json) if isinstance(spec_json, str) else spec_json
        blobs: dict[tuple[int, int, int], bytes | None] = {}
        by_shard: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for _pos, g, start, end in spec["rows"]:
            by_shard[g].append((start, end))
        for g, ranges in by_shard.items():
            path, is_s3, url = spec["shards"][str(g)]
            try:
                got = read_ranges(_filesystem(s3 if is_s3 else None), path, ranges)
                blobs.update({(g, *r): b for r, b in got.items()})
            except OSError as err:
                log.warning("cannot read %d samples of %s: %s", len(ranges), url, err)
                blobs.update({(g, *r): None for r in ranges})
        rows: list[tuple] = []
        for pos, g, start, end in spec["rows"]:
            rng = np.random.default_rng([*spec.get("aug", (0, 0)), g, start])
            rows.append(_decode_one(pos, blobs[(g, start, end)], spec["shards"][str(g)][2], pre, views, table,
                                    limits, rng))
            if len(rows) == OUT_ROWS:
                yield _block(rows, side, tokenizer, views, table)
                rows = []
        if rows:
            yield _block(rows, side, tokenizer, views, table)


def _draft(size) -> int | None:
    """The crop's side, the smallest a JPEG may be drafted to (see :func:`~cliplab.data.decode.load_rgb`)."""
    return size[0] if isinstance(size, (tuple, list)) else size


def _decode_one(pos: int, blob: bytes | None, url: str, pre, views: int, table, limits: Limits,
                rng: np.random.Generator) -> tuple:
    """``(pos, key, reason, caption, image, image_2, embedding)``; reason None for a good sample."""
    if blob is None:
        return pos, "", "read_error", None, None, None, None
    try:
        group = parse_sample(blob, limits)
    except ShardFault as err:  # the shard changed since it was indexed
        log.warning("skipping %s at byte %s: unreadable tar members (%s)", url, pos, err.detail)
        return pos, "", "read_error", None, None, None, None
    reason = check_group(group)
    embedding = None
    if reason is None and table is not None:
        embedding = table.get(group.key)
        if embedding is None:
            reason = "missing_embedding"
    sample = Skip(reason) if reason else decode_sample(group, draft=_draft(pre.size))
    if isinstance(sample, Skip):
        log.warning("skipping %s:%s: %s", url, group.key, sample)
        return pos, group.key, sample.reason, None, None, None, None
    image = np.asarray(pre(sample.image, rng), dtype=np.uint8)
    image_2 = np.asarray(pre(sample.image, rng), dtype=np.uint8) if views == 2 else None
    return pos, group.key, None, sample.caption, image, image_2, embedding


def _block(rows: list[tuple], side: int, tokenizer, views: int, table) -> dict[str, np.ndarray]:
    n = len(rows)
    ok = [i for i, r in enumerate(rows) if r[2] is None]
    image = np.zeros((n, side, side, 3), np.uint8)
    for i in ok:
        image[i] = rows[i][4]
    tokens = tokenizer([rows[i][3] for i in ok]).numpy().astype(np.int64) if ok else None
    text = np.zeros((n, tokens.shape[1] if tokens is not None else 1), np.int64)
    if tokens is not None:
        text[ok] = tokens
    out = {
        "pos": np.array([r[0] for r in rows], np.int64),
        "key": np.array([r[1] for r in rows], dtype=object),
        "skip": np.array([0 if r[2] is None else _CODE[r[2]] for r in rows], np.int16),
        "image": image,
        "text": text,
    }
    if views == 2:
        image_2 = np.zeros_like(image)
        for i in ok:
            image_2[i] = rows[i][5]
        out["image_2"] = image_2
    if table is not None:
        dim = len(next(iter(table.values())))
        emb = np.zeros((n, dim), np.float32)
        for i in ok:
            emb[i] = rows[i][6]
        out["caption_embedding"] = emb
    return out
