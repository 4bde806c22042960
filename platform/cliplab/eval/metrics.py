"""Retrieval recall@k and zero-shot accuracy, scored by the objective's own similarity.

:func:`evaluate_embeddings` is what the trainer calls on its val split; it delegates to
:func:`cliplab.eval.scoring.evaluate_pairs`, the same code ``cliplab eval`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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


def zero_shot_accuracy(image_emb: torch.Tensor, labels: Sequence[str], class_emb: torch.Tensor,
                       classnames: Sequence[str], similarity: Callable) -> dict[str, float]:
    """Top-1, top-5 and mean per-class accuracy of ``argmax similarity(image, class prompts)``,
    for string ``labels`` naming rows of ``classnames``."""
    index = {c: i for i, c in enumerate(classnames)}
    target = torch.tensor([index[label] for label in labels])
    return zero_shot_report(image_emb, target, class_emb, similarity)


@torch.no_grad()
def evaluate_embeddings(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    objective,
    batches: Iterable[dict],
    templates: Sequence[str],
    *,
    lenses: bool = True,
) -> dict[str, float]:
    """Run retrieval (+ zero-shot when batches carry non-empty ``label``) over val batches.

    ``encode_*`` return raw features; ``objective.embed`` maps them into its geometry. The
    scoring is :func:`cliplab.eval.scoring.evaluate_pairs` (shared with ``cliplab eval``).
    Returns keys ``val/image_to_text_R1``, ``…_R5``, ``…_R10``, ``val/text_to_image_R*``,
    ``val/num_samples``, ``val/retrieval_chance_R1``; with labels ``val/zeroshot_top1``,
    ``val/zeroshot_top5``, ``val/zeroshot_mean_per_class``, ``val/zeroshot_num_classes``; and the
    lenses as ``val/lens/…`` (see :func:`cliplab.eval.lenses.lens_report`).
    """
    from cliplab.eval.scoring import evaluate_pairs

    images, texts, labels = [], [], []
    for batch in batches:
        images.append(objective.embed(encode_images(torch.as_tensor(batch["image"])), "image"))
        texts.append(objective.embed(encode_texts(list(batch["caption"])), "text"))
        labels.extend(str(x) for x in batch["label"])
    if not images:
        return {}
    image_emb, text_emb = torch.cat(images), torch.cat(texts)
    classnames = sorted({label for label in labels if label})
    zero_shot = len(classnames) >= 2 and all(labels)
    out = evaluate_pairs(objective, image_emb, text_emb, lenses=lenses,
                         labels=labels if zero_shot else None, classnames=classnames if zero_shot else None,
                         encode_texts=encode_texts, templates=templates)
    return {f"val/{k}": v for k, v in out.items()}


def evaluate_module(module, tokenizer: Callable, batches: Iterable[dict], templates: Sequence[str], *,
                    lenses: bool = True) -> dict[str, float]:
    """:func:`evaluate_embeddings` of a :class:`cliplab.models.DualEncoder` (unwrapped from DDP)
    in eval mode: every batch and prompt moves to the module's device before it meets an encoder
    (DDP's own input move never runs here), and the scoring happens on that device."""
    from cliplab.models import encode_images, encode_texts

    module.eval()
    return evaluate_embeddings(lambda images: encode_images(module.model, images),
                               lambda texts: encode_texts(module.model, tokenizer, texts),
                               module.objective, batches, templates, lenses=lenses)

