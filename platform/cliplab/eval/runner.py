"""``cliplab eval``: load a model, open eval sets, embed them as Ray tasks, score, report.

:func:`run_eval` is all of it; each job has its module:

- :mod:`cliplab.eval.loading`: :func:`~cliplab.eval.loading.load_model` (a registry model or a
  checkpoint, through :func:`cliplab.checkpoint.load_module`).
- :mod:`cliplab.eval.sets`: :func:`~cliplab.eval.sets.open_eval_set` (a classification set:
  zero-shot; or training shards: retrieval + lenses, and MERU traversals when the shards' JSON
  carries an emoji-style ``group``/``subgroup`` hierarchy).
- :mod:`cliplab.eval.embedding`: :func:`~cliplab.eval.embedding.embed_set` (raw features as Ray
  tasks with fractional CPUs, or in-process).
- here: :func:`evaluate_set`, the scoring of one set by :mod:`cliplab.eval.scoring` (the code the
  trainer's in-training eval runs too) and the traversals.
- :mod:`cliplab.eval.report`: ``eval_report.json`` / ``eval_report.md`` and MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cliplab.errors import ConfigError, DataError
from cliplab.eval.embedding import embed_set
from cliplab.eval.loading import LoadedModel, load_model
from cliplab.eval.report import SetResult, build_report, log_to_mlflow, start_mlflow_run, write_report
from cliplab.eval.sets import EvalSet, make_names_unique, open_eval_set


def _hierarchy_pool(model: LoadedModel, captions: list[str], metas: list[dict], text_emb: torch.Tensor):
    """The traversal pool of an emoji-style set: level 0 = the distinct captions (names), level 1
    = subgroup captions, level 2 = group captions; plus each image's own texts per level."""
    from cliplab.data.emoji import group_caption, subgroup_caption

    objective = model.objective
    name_index: dict[str, int] = {}
    for i, c in enumerate(captions):
        name_index.setdefault(c, i)
    names = list(name_index)
    subgroups = list(dict.fromkeys(subgroup_caption(m["subgroup"]) for m in metas))
    groups = list(dict.fromkeys(group_caption(m["group"]) for m in metas))
    texts = names + subgroups + groups
    generic = objective.embed(model.encode_texts(subgroups + groups), "text")
    pool = torch.cat([text_emb[[name_index[n] for n in names]], generic])
    levels = [0] * len(names) + [1] * len(subgroups) + [2] * len(groups)
    at = {t: i for i, t in enumerate(texts)}
    truth = [{0: at[c], 1: at[subgroup_caption(m["subgroup"])], 2: at[group_caption(m["group"])]}
             for c, m in zip(captions, metas, strict=True)]
    return texts, pool, levels, truth


def traversal_report(model: LoadedModel, image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str],
                     metas: list[dict], *, max_images: int = 200, steps: int = 50, examples: int = 10,
                     require_entailment: bool = True) -> tuple[dict[str, float], list[dict]]:
    """MERU's image traversals over the set's hierarchy pool (names, subgroups, groups, [ROOT])
    for up to ``max_images`` images, as ``traversal/…`` metrics
    (:func:`cliplab.eval.lenses.traversal_order`) and examples (one image per group first).
    ``require_entailment`` (Lorentz only): retrieve only texts whose cone holds the point, as MERU."""
    from cliplab.eval import lenses

    objective = model.objective
    texts, pool, levels, truth = _hierarchy_pool(model, captions, metas, text_emb)
    geometry = lenses.geometry_of(objective)
    # spread the traversed images over the groups, deterministically
    by_group: dict[str, list[int]] = {}
    for i, m in enumerate(metas):
        by_group.setdefault(m["group"], []).append(i)
    order: list[int] = []
    queues = [list(v) for v in by_group.values()]
    while len(order) < min(max_images, len(metas)):
        for q in queues:
            if q and len(order) < max_images:
                order.append(q.pop(0))
    paths = lenses.image_traversals(image_emb[order], pool, geometry, c=lenses.curvature_of(objective),
                                    k=lenses.aperture_k_of(objective), steps=steps,
                                    require_entailment=require_entailment)
    stats = lenses.traversal_order(paths, levels, [truth[i] for i in order])
    named = texts + [lenses.ROOT]
    shown = [{"image": captions[i], "group": metas[i]["group"], "traversal": [named[p] for p in path]}
             for i, path in zip(order[:examples], paths[:examples], strict=False)]
    stats["num_images"] = float(len(order))
    stats["entailment_gated"] = float(require_entailment and geometry == "lorentz")
    return {f"traversal/{k}": v for k, v in stats.items()}, shown


def evaluate_set(model: LoadedModel, evalset: EvalSet, *, use_ray: bool = True, num_cpus: float = 0.5,
                 num_gpus: float = 0.0,
                 min_tasks: int = 2, batch_size: int = 64, lenses: bool = True, traversals: int = 200,
                 traversal_entailment: bool = True, progress: bool = True) -> SetResult:
    """Embed ``evalset`` (:func:`embed_set`) and score it in the objective's geometry:
    zero-shot (:func:`cliplab.eval.scoring.evaluate_classification`) or retrieval + lenses
    (:func:`cliplab.eval.scoring.evaluate_pairs`) + traversals when the JSON has a hierarchy."""
    from cliplab.eval.scoring import class_embeddings, evaluate_classification, evaluate_pairs

    start = time.monotonic()
    feats = embed_set(model, evalset, use_ray=use_ray, num_cpus=num_cpus, num_gpus=num_gpus, min_tasks=min_tasks,
                      batch_size=batch_size, progress=progress)
    n = len(feats["key"])
    if n < 2:
        raise DataError(f"--data {evalset.url}: {n} usable samples (skipped: {feats['skipped'] or 'none'}); "
                        "an eval set needs at least 2")
    objective = model.objective
    device = model.device  # the objective's parameters live there: score there
    with torch.no_grad():
        image_emb = objective.embed(torch.from_numpy(feats["image"]).to(device), "image")
        examples: list[dict] = []
        if evalset.kind == "classification":
            targets = torch.from_numpy(feats["target"]).to(device)
            if int(targets.max()) >= len(evalset.classnames):
                raise DataError(f"--data {evalset.url}: class index {int(targets.max())} but classnames.txt "
                                f"names {len(evalset.classnames)} classes")
            class_emb = class_embeddings(objective, model.encode_texts, evalset.classnames, evalset.templates)
            metrics = evaluate_classification(objective, image_emb, targets, class_emb, lenses=lenses)
            metrics["num_templates"] = float(len(evalset.templates))
        else:
            text_emb = objective.embed(torch.from_numpy(feats["text"]).to(device), "text")
            metrics = evaluate_pairs(objective, image_emb, text_emb, lenses=lenses)
            if traversals and all("group" in m and "subgroup" in m for m in feats["meta"]):
                extra, examples = traversal_report(model, image_emb, text_emb, feats["caption"], feats["meta"],
                                                   max_images=traversals, require_entailment=traversal_entailment)
                metrics.update(extra)
    return SetResult(evalset, metrics, feats["skipped"], examples, time.monotonic() - start)


def run_eval(model_ref: str, data: Sequence[str], *, out_dir: str | Path, tracking_uri: str | None = None,
             experiment: str = "cliplab-eval", use_ray: bool = True, num_cpus: float = 0.5, min_tasks: int = 2,
             batch_size: int = 64, templates: str | None = None, lenses: bool = True, traversals: int = 200,
             traversal_entailment: bool = True, s3cfg=None, progress: bool = True, device: str = "auto",
             num_gpus: float = 0.0, on_result: Callable[[SetResult], None] | None = None) -> dict[str, Any]:
    """``cliplab eval`` as a function: load the model, open every set (all checked before any
    embedding), evaluate them, write the report into ``out_dir`` and, with a tracking URI, log it
    to MLflow. Returns the report (``report["mlflow_run_id"]`` when logged).

    ``device`` (``auto``: a GPU when this process sees one) holds the model for in-process
    embedding and the scoring; with Ray, each embedding task asks for ``num_gpus`` GPUs and embeds
    on its GPU when it gets one."""
    from cliplab.models import resolve_device
    from cliplab.tracking.tracker import check_reachable

    if not data:
        raise ConfigError("nothing to evaluate: pass at least one --data PATH_OR_S3_URL")
    if num_gpus < 0:
        raise ConfigError(f"--gpus-per-task must be >= 0, got {num_gpus:g}")
    target = resolve_device(device)
    check_reachable(tracking_uri)
    sets = [open_eval_set(url, s3cfg, templates=templates) for url in data]
    make_names_unique(sets)
    model = load_model(model_ref, tracking_uri)
    model.module.to(target)
    results = []
    for s in sets:
        result = evaluate_set(model, s, use_ray=use_ray, num_cpus=num_cpus, num_gpus=num_gpus, min_tasks=min_tasks,
                              batch_size=batch_size, lenses=lenses, traversals=traversals,
                              traversal_entailment=traversal_entailment, progress=progress)
        results.append(result)
        if on_result:
            on_result(result)
    report = build_report(model, results)
    tracker = start_mlflow_run(report, tracking_uri, experiment=experiment) if tracking_uri else None
    if tracker is not None:
        report["mlflow_run_id"] = tracker.run_id
    files = write_report(report, out_dir)
    report["files"] = [str(p) for p in files]
    if tracker is not None:
        log_to_mlflow(tracker, report, files)
    return report
