"""Ray Data pipeline: webdataset shards → decode → open_clip transform → tokenize, in CPU tasks.

Ray Data's ``iter_torch_batches`` can't convert string columns, so tokenizing happens here, in
``map_batches``, and the train stream carries only arrays: ``image`` (float32, C×H×W) and
``text`` (int64 token ids). The val stream keeps ``caption`` and ``label`` strings for eval,
which is read with ``iter_batches(batch_format="numpy")``.
"""

from __future__ import annotations

import io
import json
import logging
from functools import lru_cache
from typing import Any

import numpy as np

from cliplab.data.sources import ShardSet

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@lru_cache(maxsize=4)
def _transforms(model_name: str, train: bool):
    """open_clip's transform and tokenizer for ``model_name``, built once per worker process."""
    import open_clip

    from cliplab.models import _register_bundled_configs

    _register_bundled_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{model_name}'")
    size = cfg["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(size, is_train=train)
    tokenizer = open_clip.get_tokenizer(model_name)
    return transform, tokenizer


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are decompression bombs (PIL's default is 89M)


def _image_bytes(batch: dict[str, Any], i: int) -> bytes | None:
    for ext in IMAGE_EXTS:
        col = batch.get(ext)
        if col is not None and col[i] is not None:
            return col[i]
    return None


def load_rgb(raw: bytes, draft: int | None = None):
    """Decode ``raw`` to an RGB PIL image: ``(image, None)`` or ``(None, (reason, detail))`` with
    reason ``decompression_bomb`` (over :data:`MAX_IMAGE_PIXELS`), ``truncated_image`` or
    ``corrupt_image``. ``draft`` lets JPEG decode at a reduced scale that is still at least
    ``draft`` pixels on each side (much cheaper for large photos)."""
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                    im.draft("RGB", (draft, draft))
                return im.convert("RGB"), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, ("decompression_bomb", str(err))
    except Exception as err:  # noqa: BLE001 - any undecodable image is skipped, never fatal
        text = str(err) or type(err).__name__
        return None, ("truncated_image" if "truncated" in text.lower() else "corrupt_image", text)


def _text(value) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    text = text.strip()
    return text or None


_TABLES: dict[Any, dict] = {}


def _caption_table(ref) -> dict | None:
    """The broadcast ``key → caption embedding`` table, fetched once per worker process."""
    if ref is None:
        return None
    if ref not in _TABLES:
        import ray

        _TABLES[ref] = ray.get(ref)
    return _TABLES[ref]


def decode_batch(batch: dict[str, Any], *, model_name: str, train: bool, label_key: str | None,
                 views: int = 1, captions_ref=None) -> dict[str, np.ndarray]:
    """Decode one Ray Data batch of raw webdataset columns. Unusable samples are dropped with
    a warning naming shard and key. (This is the val/eval path; training reads through
    :mod:`cliplab.data.stream`, which counts every skip by reason.)

    ``views=2`` adds a second augmented view (``image_2``); ``captions_ref`` (an object ref of a
    ``key → embedding`` dict) adds ``caption_embedding``, joined by key (X-CLR)."""
    transform, tokenizer = _transforms(model_name, train)
    table = _caption_table(captions_ref)
    keys, images, images_2, side, captions, labels = [], [], [], [], [], []
    n = len(batch["__key__"])
    for i in range(n):
        key = batch["__key__"][i]
        where = f"{batch.get('__url__', ['?'] * n)[i]}:{key}"
        raw = _image_bytes(batch, i)
        try:
            caption = _text(batch["txt"][i]) if "txt" in batch else None
        except UnicodeDecodeError:
            caption = None
        if raw is None or caption is None:
            log.warning("skipping %s: missing %s", where, "image" if raw is None else "caption")
            continue
        if table is not None and key not in table:
            log.warning("skipping %s: no caption embedding for this key", where)
            continue
        rgb, problem = load_rgb(raw)
        if rgb is None:
            log.warning("skipping %s: %s (%s)", where, problem[0].replace("_", " "), problem[1])
            continue
        view = transform(rgb).numpy()
        view_2 = transform(rgb).numpy() if views == 2 else None
        images.append(view)
        if view_2 is not None:
            images_2.append(view_2)
        if table is not None:
            side.append(table[key])
        keys.append(key)
        captions.append(caption)
        label = ""
        if label_key and "json" in batch and batch["json"][i] is not None:
            try:
                label = str(json.loads(batch["json"][i]).get(label_key, ""))
            except (ValueError, AttributeError):
                label = ""
        labels.append(label)
    c, h, w = images[0].shape if images else (3, 1, 1)
    out: dict[str, np.ndarray] = {
        "key": np.array(keys, dtype=object),
        "image": np.stack(images) if images else np.zeros((0, c, h, w), np.float32),
    }
    if views == 2:
        out["image_2"] = np.stack(images_2) if images_2 else out["image"].copy()
    if table is not None:
        out["caption_embedding"] = np.stack(side) if side else np.zeros((0, 1), np.float32)
    if train:
        out["text"] = tokenizer(captions).numpy().astype(np.int64) if captions else np.zeros((0, 1), np.int64)
        del out["key"]
    else:
        out["caption"] = np.array(captions, dtype=object)
        out["label"] = np.array(labels, dtype=object)
    return out


def build_dataset(shards: ShardSet, *, model_name: str, train: bool, label_key: str | None,
                  shuffle_files: bool = False, seed: int = 0, cpus_per_task: float = 1.0,
                  views: int = 1, captions_ref=None):
    """A lazy Ray Dataset over ``shards``: read raw bytes, then decode/transform/tokenize."""
    import ray.data
    from ray.data import FileShuffleConfig

    ds = ray.data.read_webdataset(
        list(shards.paths),
        filesystem=shards.filesystem,
        decoder=None,
        include_paths=False,
        shuffle=FileShuffleConfig(seed=seed) if shuffle_files else None,
        num_cpus=cpus_per_task,
    )
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"model_name": model_name, "train": train, "label_key": label_key, "views": views,
                   "captions_ref": captions_ref},
        batch_size=64,
        batch_format="numpy",
        num_cpus=cpus_per_task,
    )
