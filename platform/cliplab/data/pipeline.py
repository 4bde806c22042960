"""The val pipeline: each val shard read by one Ray Data task through the shared sample decoder.

Samples are decoded by :mod:`cliplab.data.decode`, as in training and ``cliplab eval``: the
same key rule, member caps and skip reasons. A bad sample or a bad shard becomes a flagged row
(``skip``), never a failed task, so the eval goes on without it and the worker counts it as
``val/skipped/<reason>`` (:func:`good_rows`). Rows carry ``image`` (float32, C×H×W, open_clip's
val transform from :func:`cliplab.models.preprocessing`), ``caption`` and ``label`` (the JSON's
``data.label_key``), read with ``iter_batches(batch_format="numpy")``. Training reads through
:mod:`cliplab.data.stream`; nothing here is on its path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from cliplab.data.decode import Limits, ShardFault, Skip, decode_sample, shard_groups
from cliplab.data.sources import ShardSet
from cliplab.models import preprocessing

log = logging.getLogger(__name__)

OUT_ROWS = 64  # rows per emitted block


def read_val_shard(batch: dict[str, np.ndarray], *, filesystem, prefix: str, model_name: str,
                   label_key: str | None, limits: Limits) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: every sample of one val shard through :func:`~cliplab.data.decode.decode_sample`,
    as rows ``key, image`` (float32 C×H×W, the val transform), ``caption, label, skip``. An
    unusable sample, or a shard that cannot be read on, is a row whose ``skip`` names the reason."""
    transform, _ = preprocessing(model_name)
    for path in batch["path"]:
        rows: list[tuple] = []
        for row in _val_rows(filesystem, str(path), prefix + str(path), transform, label_key, limits):
            rows.append(row)
            if len(rows) == OUT_ROWS:
                yield _val_block(rows)
                rows = []
        if rows:
            yield _val_block(rows)


def _val_rows(filesystem, path: str, url: str, transform, label_key, limits: Limits) -> Iterator[tuple]:
    """``(key, image, caption, label, skip)`` per sample; ``image`` is None on a skipped row."""
    try:
        for group in shard_groups(filesystem, path, limits):
            sample = decode_sample(group, label_key=label_key)
            if isinstance(sample, Skip):
                log.warning("skipping %s:%s: %s", url, group.key, sample)
                yield group.key, None, "", "", sample.reason
            else:
                yield sample.key, transform(sample.image).numpy(), sample.caption, sample.label, ""
    except ShardFault as fault:
        log.warning("val shard %s: %s (%s); the rest is skipped", url, fault.reason.replace("_", " "), fault.detail)
        yield "", None, "", "", fault.reason


def _val_block(rows: list[tuple]) -> dict[str, np.ndarray]:
    shape = next((r[1].shape for r in rows if r[1] is not None), (3, 1, 1))
    image = np.zeros((len(rows), *shape), np.float32)
    for i, r in enumerate(rows):
        if r[1] is not None:
            image[i] = r[1]
    return {"key": np.array([r[0] for r in rows], dtype=object), "image": image,
            "caption": np.array([r[2] for r in rows], dtype=object),
            "label": np.array([r[3] for r in rows], dtype=object),
            "skip": np.array([r[4] for r in rows], dtype=object)}


def build_val_dataset(shards: ShardSet, *, model_name: str, label_key: str | None, cpus_per_task: float = 1.0,
                      limits: Limits = Limits()):
    """A lazy Ray Dataset of the val samples: one read task per shard (:func:`read_val_shard`),
    skipped samples included as flagged rows (:func:`good_rows` drops and counts them)."""
    import ray.data

    prefix = "s3://" if shards.is_s3 else ""
    ds = ray.data.from_items([{"path": p} for p in shards.paths], override_num_blocks=len(shards.paths))
    return ds.map_batches(read_val_shard, batch_size=1, batch_format="numpy", num_cpus=cpus_per_task,
                          fn_kwargs={"filesystem": shards.filesystem, "prefix": prefix, "model_name": model_name,
                                     "label_key": label_key, "limits": limits})


def good_rows(batches: Iterable[dict[str, np.ndarray]], skipped: Counter) -> Iterator[dict[str, np.ndarray]]:
    """``batches`` without their flagged rows, which are counted into ``skipped`` by reason."""
    for batch in batches:
        skip = np.asarray(batch["skip"], dtype=object)
        good = skip == ""
        skipped.update(str(r) for r in skip[~good])
        if good.any():
            yield {k: np.asarray(v)[good] for k, v in batch.items() if k != "skip"}


def skip_metrics(skipped: Counter, prefix: str = "val/skipped") -> dict[str, float]:
    """``{prefix}/<reason>`` for every count, and ``{prefix}/total``."""
    return {**{f"{prefix}/{r}": float(n) for r, n in skipped.items()}, f"{prefix}/total": float(sum(skipped.values()))}
