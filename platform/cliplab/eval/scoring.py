"""Scoring written once against the objective interface, for the trainer and ``cliplab eval``.

:func:`evaluate_embeddings` (:func:`evaluate_module` for a model) is what the trainer runs on its
val split; it delegates to :func:`evaluate_pairs`, the code ``cliplab eval`` runs.

Everything here takes embeddings already in the objective's geometry (``objective.embed``),
scores with ``objective.similarity`` and ensembles prompts with ``objective.ensemble``, so
every objective is judged the same way in its own space. No Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from cliplab.eval.lenses import lens_report
from cliplab.eval.metrics import retrieval_metrics, zero_shot_report


@torch.no_grad()
def class_embeddings(objective, encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """One embedding per class (C × D, in the geometry): every ``template.format(classname)``
    is encoded to raw text features (``encode_texts``, in batches) and the class's prompts are
    ensembled by ``objective.ensemble`` (normalise-mean-normalise on the sphere, the
    tangent-space mean before the lift on the hyperboloid)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = torch.cat([encode_texts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    feats = feats.view(len(classnames), len(templates), -1)
    return torch.stack([objective.ensemble(f) for f in feats])


@torch.no_grad()
def zero_shot(objective, image_emb: torch.Tensor, targets: torch.Tensor, class_emb: torch.Tensor) -> dict[str, float]:
    """``zeroshot_top1``, ``zeroshot_top5``, ``zeroshot_mean_per_class``, ``zeroshot_num_classes``
    and ``zeroshot_chance_top1`` (1 / classes) by ``objective.similarity``."""
    zs = zero_shot_report(image_emb, targets, class_emb, objective.similarity)
    out = {f"zeroshot_{k}": v for k, v in zs.items()}
    out["zeroshot_num_classes"] = float(len(class_emb))
    out["zeroshot_chance_top1"] = 1.0 / len(class_emb)
    return out


@torch.no_grad()
def evaluate_pairs(objective, image_emb: torch.Tensor, text_emb: torch.Tensor, *,
                   labels: Sequence[str] | None = None, classnames: Sequence[str] | None = None,
                   encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
                   templates: Sequence[str] = (), lenses: bool = True, ks: Sequence[int] = (1, 5, 10),
                   chunk: int = 1024) -> dict[str, float]:
    """Image-text pairs (row i of each, in the geometry) → retrieval R@k both ways (row chunks,
    O(chunk × N) memory), ``num_samples``, ``retrieval_chance_R1``, the lenses as ``lens/…``
    and, with string ``labels`` naming ``classnames`` (+ ``encode_texts`` and ``templates``),
    zero-shot accuracy over those classes."""
    out = retrieval_metrics(image_emb, text_emb, objective.similarity, ks=ks, chunk=chunk)
    out["num_samples"] = float(len(image_emb))
    out["retrieval_chance_R1"] = 1.0 / len(image_emb)
    if labels is not None and classnames:
        index = {c: i for i, c in enumerate(classnames)}
        class_emb = class_embeddings(objective, encode_texts, classnames, templates)
        targets = torch.tensor([index[x] for x in labels], device=image_emb.device)
        out.update(zero_shot(objective, image_emb, targets, class_emb.to(image_emb.device)))
    if lenses:
        out.update({f"lens/{k}": v for k, v in lens_report(objective, image_emb, text_emb).items()})
    return out


@torch.no_grad()
def evaluate_classification(objective, image_emb: torch.Tensor, targets: torch.Tensor, class_emb: torch.Tensor,
                            *, lenses: bool = True) -> dict[str, float]:
    """A labelled image set (in the geometry) against class embeddings (:func:`class_embeddings`)
    → :func:`zero_shot` metrics, ``num_samples`` and the image-only lenses as ``lens/…``."""
    out = zero_shot(objective, image_emb, targets, class_emb)
    out["num_samples"] = float(len(image_emb))
    if lenses:
        out.update({f"lens/{k}": v for k, v in lens_report(objective, image_emb).items()})
    return out


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
    scoring is :func:`evaluate_pairs` (shared with ``cliplab eval``).
    Returns keys ``val/image_to_text_R1``, ``…_R5``, ``…_R10``, ``val/text_to_image_R*``,
    ``val/num_samples``, ``val/retrieval_chance_R1``; with labels ``val/zeroshot_top1``,
    ``val/zeroshot_top5``, ``val/zeroshot_mean_per_class``, ``val/zeroshot_num_classes``; and the
    lenses as ``val/lens/…`` (see :func:`cliplab.eval.lenses.lens_report`).
    """
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

