"""``cliplab eval``: load a model, open eval sets, embed them as Ray tasks, score, report.

- :func:`load_model`: ``models:/NAME@ALIAS`` (the MLflow registry; the pyfunc's checkpoint
  artifact) or a checkpoint folder, local or ``s3://`` (``train/checkpoint.py`` layout, or a run
  folder: its latest complete checkpoint), loaded by the pyfunc's own loader.
- :func:`open_eval_set`: a classification set (``classnames.txt`` beside or above the tars:
  zero-shot) or training shards (retrieval + lenses, and MERU traversals when the shards' JSON
  carries an emoji-style ``group``/``subgroup`` hierarchy).
- :func:`embed_set`: raw features of every sample, mapped over (shard, chunk) pieces as Ray
  tasks with fractional CPUs (or in-process with ``use_ray=False``); the metrics are then
  computed on the gathered embeddings by :mod:`cliplab.eval.scoring`, the code the trainer's
  in-training eval runs too.
- :func:`run_eval`: all of it, plus ``eval_report.json`` / ``eval_report.md`` and MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import re
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplab.errors import CliplabError, ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_DIRS = ("test", "val", "validation", "train")


# models ----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for eval: the :class:`cliplab.models.DualEncoder` (open_clip model +
    objective) in eval mode, its bundle (transforms, tokenizer) and the experiment config."""

    module: Any
    bundle: Any
    cfg: Any
    source: str

    @property
    def objective(self):
        return self.module.objective

    @property
    def device(self) -> torch.device:
        from cliplab.models import model_device

        return model_device(self.module)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (unnormalised) text features, on the model's device."""
        from cliplab.models import encode_texts

        out = [encode_texts(self.module.model, self.bundle.tokenizer, texts[i:i + batch_size])
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0, self.bundle.embed_dim, device=self.device)


def _load_checkpoint(path: Path, source: str) -> LoadedModel:
    from types import SimpleNamespace

    from cliplab.train.checkpoint import (
        IncompleteCheckpointError,
        UnsafeCheckpointError,
        is_complete,
        latest_checkpoint,
        load_config,
    )

    with warnings.catch_warnings():  # mlflow's type-hint advice on the pyfunc class, under its own filter
        warnings.showwarning = lambda *args, **kwargs: None
        from cliplab.tracking.pyfunc import CliplabPyfunc

    if not is_complete(path):
        latest = latest_checkpoint(path) if path.is_dir() else None
        if latest is None:
            raise ConfigError(f"--model {source}: not a complete checkpoint folder (no COMPLETE marker, no "
                              "checkpoint_* inside); pass a checkpoint written by cliplab train, a run folder, "
                              "or models:/NAME@ALIAS")
        path = latest
    root = logging.getLogger()
    level = root.level
    try:
        pyfunc = CliplabPyfunc()  # the registry's loader: config.json → model + objective, weights
        root.setLevel(logging.ERROR)  # open_clip warns that a random init has no pretrained weights
        pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))
    except (IncompleteCheckpointError, UnsafeCheckpointError, FileNotFoundError) as err:
        raise ConfigError(f"--model {source}: {err}") from None
    finally:
        root.setLevel(level)
    return LoadedModel(pyfunc.module, pyfunc.bundle, load_config(path), source)


def _load_from_s3(ref: str) -> LoadedModel:
    """A checkpoint or run folder (its latest complete checkpoint) under an ``s3://`` storage_path;
    endpoint and keys from the AWS_* environment."""
    import tempfile

    from pyarrow import fs

    from cliplab.train.checkpoint import MARKER, fetch_checkpoint, latest_in_storage, run_storage

    try:
        filesystem, path = run_storage(ref)
        if filesystem.get_file_info(f"{path}/{MARKER}").type != fs.FileType.File:
            found = latest_in_storage(ref)
            if found is None:
                raise ConfigError(f"--model {ref}: no complete checkpoint there (no COMPLETE marker, no "
                                  "checkpoint_* inside); pass a checkpoint or run folder written by cliplab train")
            path = found[1]
        with tempfile.TemporaryDirectory(prefix="cliplab-eval-model-") as tmp:
            return _load_checkpoint(fetch_checkpoint(path, Path(tmp) / "checkpoint", filesystem), ref)
    except OSError as err:
        from cliplab.data.sources import s3_error_message

        raise ConfigError(f"--model: {s3_error_message(err, ref)}") from None


def load_model(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) from the MLflow registry at
    ``tracking_uri``, or a checkpoint/run folder, local or ``s3://``. Raises :class:`ConfigError`
    saying what to pass."""
    if ref.startswith("s3://"):
        return _load_from_s3(ref)
    if not ref.startswith("models:/"):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ConfigError(f"--model {ref}: no such checkpoint folder; pass a checkpoint folder or "
                              "models:/NAME@ALIAS (with --tracking-uri)")
        return _load_checkpoint(path, ref)
    if not tracking_uri:
        raise ConfigError(f"--model {ref} needs the MLflow registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="cliplab-eval-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp,
                                                             tracking_uri=tracking_uri))
        except MlflowException as err:
            raise ConfigError(f"--model {ref}: {str(err).splitlines()[0]} (see `cliplab registry list`)") from None
        found = [p.parent for p in local.rglob("COMPLETE")]
        if not found:
            raise ConfigError(f"--model {ref} is not a cliplab model (no checkpoint artifact inside)")
        return _load_checkpoint(found[0], ref)


# eval sets -------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One ``--data``: its shards and, for a classification set, its classes and prompts."""

    url: str
    name: str
    kind: str  # classification | retrieval
    shards: Any  # cliplab.data.sources.ShardSet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    templates_source: str = ""


def _read_text(filesystem, path: str) -> str | None:
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def _set_name(folder: str) -> str:
    base = posixpath.basename(folder.rstrip("/")) or "data"
    if base in SPLIT_DIRS:
        parent = posixpath.basename(posixpath.dirname(folder.rstrip("/")))
        base = f"{parent}-{base}" if parent else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def open_eval_set(url: str, s3cfg=None, *, templates: str | None = None) -> EvalSet:
    """Resolve ``url`` (local or ``s3://``; a folder of tars, or a folder holding ``test/`` or
    ``val/`` with them) and detect its kind: ``classnames.txt`` beside the tars or one folder up
    (CLIP_benchmark) makes it a zero-shot classification set, whose prompts come from
    ``templates.txt`` / ``zeroshot_classification_templates.txt`` there, else the OpenAI 80;
    otherwise it is a retrieval set in the training layout. ``templates`` (a name or a file,
    :func:`cliplab.eval.templates.resolve_templates`) overrides the set's own prompts."""
    from cliplab.config import S3Config
    from cliplab.data.evalsets import CLASSNAMES, TEMPLATES, read_classnames
    from cliplab.data.sources import resolve_shards
    from cliplab.eval.templates import OPENAI_IMAGENET, parse_templates, resolve_templates

    s3cfg = s3cfg or S3Config()
    try:
        shards = resolve_shards(url, s3cfg)
    except DataError as first:
        for sub in ("test", "val"):
            try:
                shards = resolve_shards(url.rstrip("/") + f"/{sub}/", s3cfg)
                break
            except DataError:
                continue
        else:
            raise DataError(f"--data {url}: {first}; point --data at a folder of .tar shards (a classification "
                            "set with classnames.txt, e.g. from `cliplab data fashion-mnist`, or training "
                            "shards such as OUT/val)") from None
    folder = posixpath.dirname(shards.paths[0])
    name = _set_name(folder)
    for where in (folder, posixpath.dirname(folder)):
        text = _read_text(shards.filesystem, posixpath.join(where, CLASSNAMES))
        if text is None:
            continue
        classnames = read_classnames(text, f"{url} {CLASSNAMES}")
        if templates:
            chosen, source = resolve_templates(templates), templates
        else:
            chosen, source = list(OPENAI_IMAGENET), "openai (the set has no templates.txt)"
            for tname in TEMPLATES:
                body = _read_text(shards.filesystem, posixpath.join(where, tname))
                if body is not None:
                    chosen, source = parse_templates(body, f"{url} {tname}"), tname
                    break
        return EvalSet(url, name, "classification", shards, classnames, chosen, source)
    return EvalSet(url, name, "retrieval", shards)


def iter_shard(path: str, filesystem) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one tar as ``(key, {ext: bytes})`` in tar order, read by the shared decoder
    (:mod:`cliplab.data.decode`: its key rule and member caps). For tools and tests; a shard that
    cannot be read on is a :class:`DataError`."""
    from cliplab.data.decode import Limits, ShardFault, shard_groups

    try:
        for group in shard_groups(filesystem, path, Limits()):
            yield group.key, group.files
    except ShardFault as fault:
        raise DataError(f"{path}: {fault.reason.replace('_', ' ')} ({fault.detail})") from None


def _piece_samples(path: str, filesystem, kind: str, part: int, parts: int, limits, skipped: Counter) -> Iterator:
    """The samples ``i % parts == part`` of one shard, decoded by
    :func:`cliplab.data.decode.decode_sample` (the decoder of training and val: same key rule,
    caps and skip reasons); skips are counted into ``skipped`` (a shard fault by part 0 only)."""
    from cliplab.data.decode import ShardFault, Skip, decode_sample, shard_groups

    try:
        for i, group in enumerate(shard_groups(filesystem, path, limits)):
            if i % parts != part:
                continue
            sample = decode_sample(group, kind="cls" if kind == "classification" else "caption")
            if isinstance(sample, Skip):
                log.warning("skipping %s:%s: %s", path, group.key, sample)
                skipped[sample.reason] += 1
            else:
                yield sample
    except ShardFault as fault:
        if part == 0:
            log.warning("eval shard %s: %s (%s); the rest is skipped", path, fault.reason.replace("_", " "),
                        fault.detail)
            skipped[fault.reason] += 1


# embedding -------------------------------------------------------------------------------------
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

    for sample in _piece_samples(path, filesystem, kind, part, parts, limits or Limits(), skipped):
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

    from cliplab.train.launch import init_ray

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


# scoring one set -------------------------------------------------------------------------------
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


@dataclass
class SetResult:
    evalset: EvalSet
    metrics: dict[str, float]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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


# reports ---------------------------------------------------------------------------------------
def metric_name(set_name: str, key: str) -> str:
    """The MLflow name of one metric: ``eval/{set}/{key}``, with characters MLflow rejects
    (``@`` among them) replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", f"eval/{set_name}/{key}")


def _unique_names(sets: Sequence[EvalSet]) -> None:
    seen: Counter = Counter()
    for s in sets:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name}-{seen[s.name]}"


def build_report(model: LoadedModel, results: Sequence[SetResult]) -> dict[str, Any]:
    """The JSON report: model, objective, its scalars, one entry per set and the flat MLflow metrics."""
    from cliplab.eval.lenses import geometry_of

    sets, flat = [], {}
    for r in results:
        entry = {"name": r.evalset.name, "url": r.evalset.url, "kind": r.evalset.kind,
                 "shards": len(r.evalset.shards.paths), "skipped": r.skipped, "seconds": round(r.seconds, 2),
                 "metrics": r.metrics}
        if r.evalset.kind == "classification":
            entry.update(classnames=r.evalset.classnames, templates=r.evalset.templates,
                         templates_source=r.evalset.templates_source)
        if r.examples:
            entry["traversal_examples"] = r.examples
        sets.append(entry)
        flat.update({metric_name(r.evalset.name, k): v for k, v in r.metrics.items()})
    return {"model": model.source, "objective": model.cfg.objective.name, "geometry": geometry_of(model.objective),
            "model_name": model.cfg.model.name, "scalars": model.objective.metrics(), "datasets": sets,
            "metrics": flat}


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def markdown_report(report: dict[str, Any]) -> str:
    """A Markdown rendering of :func:`build_report`: one metric table per set, and traversal examples."""
    lines = [f"# cliplab eval: {report['model']}", "",
             f"objective `{report['objective']}` ({report['geometry']} geometry), model `{report['model_name']}`; "
             + ", ".join(f"{k.split('/')[-1]} {_fmt(v)}" for k, v in report["scalars"].items()), ""]
    for d in report["datasets"]:
        m = d["metrics"]
        what = (f"zero-shot classification, {int(m['num_samples'])} images, {int(m['zeroshot_num_classes'])} "
                f"classes, {int(m['num_templates'])} templates ({d['templates_source']})"
                if d["kind"] == "classification" else f"retrieval, {int(m['num_samples'])} pairs")
        lines += [f"## {d['name']}: {what}", "", f"`{d['url']}`"
                  + (f"; skipped {d['skipped']}" if d["skipped"] else ""), "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items()]
        if d.get("traversal_examples"):
            lines += ["", "Image traversals toward [ROOT] (image caption: retrieved texts):", ""]
            lines += [f"- {e['image']}: " + " → ".join(e["traversal"]) for e in d["traversal_examples"]]
        lines.append("")
    return "\n".join(lines)


def _no_nan(value):
    """NaN → None (JSON null), recursively: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``eval_report.json`` and ``eval_report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval_report.json", out / "eval_report.md"]
    paths[0].write_text(json.dumps(_no_nan(report), indent=2, ensure_ascii=False, allow_nan=False))
    paths[1].write_text(markdown_report(report))
    return paths


def start_mlflow_run(report: dict[str, Any], uri: str, *, experiment: str = "cliplab-eval",
                     run_name: str | None = None):
    """A new MLflow run for ``report`` (tags ``cliplab.kind=eval``, ``cliplab.model``)."""
    from cliplab.tracking.secrets import Redactor
    from cliplab.tracking.tracker import MlflowTracker

    model = Redactor().text(report["model"])
    return MlflowTracker(uri, experiment, run_name=run_name or f"eval {model}",
                         tags={"cliplab.kind": "eval", "cliplab.model": model})


def log_to_mlflow(tracker, report: dict[str, Any], files: Sequence[Path]) -> str:
    """Into the run of ``tracker`` (:func:`start_mlflow_run`): the flat metrics (step 0; NaNs
    left out), the model and sets as params, and the report files as artifacts under ``eval/``;
    then the run is finished. Returns the run id."""
    from cliplab.tracking.secrets import Redactor

    try:
        tracker.log_params(Redactor().params({"model": report["model"], "objective": report["objective"],
                                              "geometry": report["geometry"], "model_name": report["model_name"],
                                              "data": " ".join(d["url"] for d in report["datasets"])}))
        metrics = {k: v for k, v in report["metrics"].items() if not math.isnan(v)}
        keys = list(metrics)
        for i in range(0, len(keys), 500):
            tracker.log_metrics({k: metrics[k] for k in keys[i:i + 500]}, step=0)
        for path in files:
            tracker.log_artifact(path, "eval")
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id


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
    _unique_names(sets)
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
