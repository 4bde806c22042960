"""Retrieval recall@k and zero-shot top-k accuracy of embeddings under a given similarity: the
counting that :mod:`cliplab.eval.scoring` builds on. Pure torch, no objective, no model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, similarity: Callable,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Image→text and text→image recall@k for aligned pairs (row i of each is pair i), in row
    chunks so memory stays O(chunk × N). Keys ``image_to_text_R{k}``, ``text_to_image_R{k}``.
    A tie with the correct item counts in its favour."""
    out: dict[str, float] = {}
    for name, queries, items in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        hits = {k: 0.0 for k in ks}
        for start in range(0, len(queries), chunk):
            q = queries[start:start + chunk]
            sim = similarity(q, items)  # chunk × N; query start+r's correct item is column start+r
            correct = sim[torch.arange(len(q)), torch.arange(start, start + len(q))].unsqueeze(1)
            rank = (sim > correct).sum(dim=1)  # 0 = the correct item is first; ties count for it
            for k in ks:
                hits[k] += float((rank < k).sum())
        for k in ks:
            out[f"{name}_R{k}"] = hits[k] / len(queries)
    return out


def zero_shot_report(image_emb: torch.Tensor, targets: torch.Tensor, class_emb: torch.Tensor,
                     similarity: Callable, ks: Sequence[int] = (1, 5), chunk: int = 4096) -> dict[str, float]:
    """Top-k accuracy (``top{k}``; k is capped at the number of classes) and the mean per-class
    top-1 accuracy (``mean_per_class``, over the classes present in ``targets``) of ranking the
    ``class_emb`` rows by ``similarity(image, class)``; ``targets`` are class indices."""
    targets = torch.as_tensor(targets, dtype=torch.long).to(image_emb.device)
    n_classes = len(class_emb)
    correct = {k: torch.zeros(len(targets), dtype=torch.bool, device=image_emb.device) for k in ks}
    for start in range(0, len(targets), chunk):
        sim = similarity(image_emb[start:start + chunk], class_emb)
        t = targets[start:start + chunk]
        top = sim.topk(min(max(ks), n_classes), dim=1).indices
        for k in ks:
            correct[k][start:start + len(t)] = (top[:, :min(k, n_classes)] == t[:, None]).any(dim=1)
    top1 = correct[ks[0]].float() if ks[0] == 1 else None
    out = {f"top{k}": float(correct[k].float().mean()) for k in ks}
    if top1 is not None:
        per_class = [float(top1[targets == c].mean()) for c in range(n_classes) if (targets == c).any()]
        out["mean_per_class"] = float(np.mean(per_class))
    return out
