"""Retrieval recall@k and zero-shot accuracy, scored by the objective's own similarity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, similarity: Callable,
                      ks: Sequence[int] = (1, 5), chunk: int = 1024) -> dict[str, float]:
    """Image→text and text→image recall@k for aligned pairs, in row chunks (O(chunk × N))."""
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


def zero_shot_accuracy(image_emb: torch.Tensor, labels: Sequence[str], class_emb: torch.Tensor,
                       classnames: Sequence[str], similarity: Callable) -> dict[str, float]:
    """Top-1 and mean per-class accuracy of ``argmax similarity(image, class prompts)``."""
    index = {c: i for i, c in enumerate(classnames)}
    target = torch.tensor([index[label] for label in labels])
    pred = similarity(image_emb, class_emb).argmax(dim=1)
    correct = (pred == target).float()
    per_class = [float(correct[target == c].mean()) for c in range(len(classnames)) if (target == c).any()]
    return {"top1": float(correct.mean()), "mean_per_class": float(np.mean(per_class))}


@torch.no_grad()
def evaluate_embeddings(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    objective,
    batches: Iterable[dict],
    templates: Sequence[str],
) -> dict[str, float]:
    """Run retrieval (+ zero-shot when batches carry non-empty ``label``) over val batches.

    ``encode_*`` return raw features; ``objective.embed`` maps them into its geometry.
    Returns keys ``val/image_to_text_R1``, …, ``val/zeroshot_top1`` and chance levels.
    """
    images, texts, labels = [], [], []
    for batch in batches:
        images.append(objective.embed(encode_images(torch.as_tensor(batch["image"])), "image"))
        texts.append(objective.embed(encode_texts(list(batch["caption"])), "text"))
        labels.extend(str(x) for x in batch["label"])
    if not images:
        return {}
    image_emb, text_emb = torch.cat(images), torch.cat(texts)
    out = {f"val/{k}": v for k, v in retrieval_metrics(image_emb, text_emb, objective.similarity).items()}
    out["val/num_samples"] = float(len(image_emb))
    out["val/retrieval_chance_R1"] = 1.0 / len(image_emb)
    classnames = sorted({label for label in labels if label})
    if len(classnames) >= 2 and all(labels):
        prompts = [[t.format(c) for t in templates] for c in classnames]
        class_emb = torch.stack([objective.ensemble(encode_texts(p)) for p in prompts])
        zs = zero_shot_accuracy(image_emb, labels, class_emb, classnames, objective.similarity)
        out["val/zeroshot_top1"] = zs["top1"]
        out["val/zeroshot_mean_per_class"] = zs["mean_per_class"]
        out["val/zeroshot_num_classes"] = float(len(classnames))
    return out
