"""``cliplab eval``'s embedding: raw features of every sample of an eval set, mapped over
(shard, chunk) pieces as Ray tasks with fractional CPUs (or in-process). The metrics are then
computed on the gathered embeddings by :mod:`cliplab.eval.scoring`, the code the trainer's
in-training eval runs too."""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cliplab.errors import CliplabError
from cliplab.eval.loading import LoadedModel
from cliplab.eval.sets import EvalSet, piece_samples


@torch.no_grad()
def encode_piece(model, transform, tokenizer, path: str, filesystem, kind: str, part: int = 0, parts: int = 1,
                 batch_size: int = 64, limits=None) -> dict[str, Any]:
    """Raw features of the samples ``i`` of one shard with ``i % parts == part``: ``key``,
    ``image`` (n × D float32), and ``target`` (class indices) for a classification set, or
    ``text`` (n × D), ``caption`` and ``meta`` (the JSON) for a retrieval set; ``skipped``
    counts unusable samples by reason (``limits``: the member caps, default
    :class:`~cliplab.data.decode.Limits`). Batches move to the model's device; features come back
    to the host."""
    from cliplab.data.decode import Limits
    from cliplab.models import encode_images, encode_texts

    keys, targets, captions, metas = [], [], [], []
    skipped: Counter = Counter()
    feats_img, feats_txt = [], []
    batch_images: list[torch.Tensor] = []
    batch_captions: list[str] = []

    def flush() -> None:
        if batch_images:
            feats_img.append(encode_images(model, torch.stack(batch_images)).float().cpu().numpy())
        if batch_captions:
            feats_txt.append(encode_texts(model, tokenizer, batch_captions).float().cpu().numpy())
        batch_images.clear()
        batch_captions.clear()

    for sample in piece_samples(path, filesystem, kind, part, parts, limits or Limits(), skipped):
        keys.append(sample.key)
        batch_images.append(transform(sample.image))
        if kind == "classification":
            targets.append(int(sample.label))
        else:
            captions.append(sample.caption)
            batch_captions.append(sample.caption)
            metas.append(sample.meta)
        if len(batch_images) >= batch_size:
            flush()
    flush()
    dim = feats_img[0].shape[1] if feats_img else 0
    out: dict[str, Any] = {"key": keys, "skipped": dict(skipped),
                           "image": np.concatenate(feats_img) if feats_img else np.zeros((0, dim), np.float32)}
    if kind == "classification":
        out["target"] = np.asarray(targets, dtype=np.int64)
    else:
        out["text"] = np.concatenate(feats_txt) if feats_txt else np.zeros((0, dim), np.float32)
        out["caption"], out["meta"] = captions, metas
    return out


_WORKER_MODELS: dict[str, tuple] = {}


def _worker_model(token: str, holder: list) -> tuple:
    """The open_clip model of ``token``, built once per Ray worker process from the payload."""
    if token not in _WORKER_MODELS:
        import ray

        from cliplab.models import build_model

        payload = ray.get(holder[0])
        logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning
        bundle = build_model(payload["model_cfg"])
        bundle.model.load_state_dict(payload["state"])
        bundle.model.eval()
        if torch.cuda.is_available():  # the task was given a GPU (num_gpus > 0): embed there
            bundle.model.to("cuda")
        _WORKER_MODELS.clear()  # one model per worker: an old eval's weights are not kept
        _WORKER_MODELS[token] = (bundle.model, bundle.val_transform, bundle.tokenizer)
    return _WORKER_MODELS[token]


def _encode_task(token: str, holder: list, path: str, filesystem, kind: str, part: int, parts: int,
                 batch_size: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, transform, tokenizer = _worker_model(token, holder)
    return encode_piece(model, transform, tokenizer, path, filesystem, kind, part, parts, batch_size)


def _gather(results: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"key": [k for r in results for k in r["key"]],
                           "image": np.concatenate([r["image"] for r in results if len(r["image"])] or
                                                   [np.zeros((0, 0), np.float32)]),
                           "skipped": dict(sum((Counter(r["skipped"]) for r in results), Counter()))}
    if kind == "classification":
        out["target"] = np.concatenate([r["target"] for r in results])
    else:
        out["text"] = np.concatenate([r["text"] for r in results if len(r["text"])] or
                                     [np.zeros((0, 0), np.float32)])
        out["caption"] = [c for r in results for c in r["caption"]]
        out["meta"] = [m for r in results for m in r["meta"]]
    return out


def embed_set(model: LoadedModel, evalset: EvalSet, *, use_ray: bool = True, num_cpus: float = 0.5,
              num_gpus: float = 0.0,
              min_tasks: int = 2, batch_size: int = 64, progress: bool = True) -> dict[str, Any]:
    """Raw features of every sample of ``evalset`` (see :func:`encode_piece`), gathered in shard
    order. With ``use_ray`` each (shard, chunk) piece is a Ray task of ``num_cpus`` CPUs (shards
    are split into chunks until there are ``min_tasks`` pieces); the weights travel once through
    the object store and each worker builds the model once. Without it, all in this process."""
    from tqdm import tqdm

    paths = list(evalset.shards.paths)
    parts = max(1, math.ceil(min_tasks / len(paths)))
    pieces = [(p, part) for p in paths for part in range(parts)]
    desc = f"embedding {evalset.name}"
    if not use_ray:
        m = model.module.model
        results = [encode_piece(m, model.bundle.val_transform, model.bundle.tokenizer, p, evalset.shards.filesystem,
                                evalset.kind, part, parts, batch_size)
                   for p, part in tqdm(pieces, desc=desc, unit="piece", disable=not progress)]
        return _gather(results, evalset.kind)

    import ray
    from ray.exceptions import RayTaskError

    from cliplab.ray_connect import init_ray

    init_ray()
    payload = {"model_cfg": replace(model.cfg.model, pretrained=None),
               "state": {k: v.detach().cpu() for k, v in model.module.model.state_dict().items()}}
    holder = [ray.put(payload)]  # in a list: tasks fetch it themselves, once per worker
    token = uuid.uuid4().hex
    task = ray.remote(_encode_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    threads = max(1, int(round(num_cpus)))
    refs = [task.remote(token, holder, p, evalset.shards.filesystem, evalset.kind, part, parts, batch_size, threads)
            for p, part in pieces]
    pending = list(refs)
    try:
        with tqdm(total=len(refs), desc=desc, unit="piece", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        results = ray.get(refs)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, CliplabError):
            raise cause from None
        raise
    return _gather(results, evalset.kind)
