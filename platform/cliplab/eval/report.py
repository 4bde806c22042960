"""``cliplab eval``'s report: one :class:`SetResult` per eval set becomes ``eval_report.json``,
``eval_report.md`` and, with a tracking URI, an MLflow run (flat ``eval/{set}/{metric}``
metrics, params, the report files as artifacts)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.eval.loading import LoadedModel
from cliplab.eval.sets import EvalSet


@dataclass
class SetResult:
    evalset: EvalSet
    metrics: dict[str, float]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def metric_name(set_name: str, key: str) -> str:
    """The MLflow name of one metric: ``eval/{set}/{key}``, with characters MLflow rejects
    (``@`` among them) replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", f"eval/{set_name}/{key}")


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
    from cliplab.redaction import Redactor
    from cliplab.tracking.tracker import MlflowTracker

    model = Redactor().text(report["model"])
    return MlflowTracker(uri, experiment, run_name=run_name or f"eval {model}",
                         tags={"cliplab.kind": "eval", "cliplab.model": model})


def log_to_mlflow(tracker, report: dict[str, Any], files: Sequence[Path]) -> str:
    """Into the run of ``tracker`` (:func:`start_mlflow_run`): the flat metrics (step 0; NaNs
    left out), the model and sets as params, and the report files as artifacts under ``eval/``;
    then the run is finished. Returns the run id."""
    from cliplab.redaction import Redactor

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
