"""A finished sweep as files: the results table (CSV + Markdown) and PNG plots (matplotlib):
the metric against each swept value, a heatmap for 2-D sweeps, and every trial's learning curve."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cliplab.report import markdown_table

# the val metrics every sweep table shows after the swept values (header, row key)
VAL_COLUMNS = (("val R@1 (i→t)", "val/image_to_text_R1"), ("val R@1 (t→i)", "val/text_to_image_R1"),
               ("zero-shot top-1", "val/zeroshot_top1"))


def table_columns(sweep) -> list[tuple[str, str]]:
    """The sweep table's columns as (header, row key), one definition for the terminal and
    ``results.csv``/``results.md``: the trial, every swept value, the sweep's metric (under its
    own name), then the objective when it is not swept, the other val metrics, the steps and the
    stop reason."""
    cols = [("trial", "trial")] + [(key, key) for key in sweep.space] + [(sweep.metric, sweep.metric)]
    if "objective.name" not in sweep.space:
        cols.append(("objective", "objective"))
    cols += [(label, key) for label, key in VAL_COLUMNS if key != sweep.metric]
    return cols + [("steps", "step"), ("stop reason", "stop_reason")]


def table_rows(sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trial rows with their ``objective`` (swept, or the base config's)."""
    return [{"objective": r.get("objective.name", sweep.base.objective.name), **r} for r in rows]


def results_table(sweep, rows: list[dict[str, Any]]) -> str:
    """The sweep table in Markdown (it reads as well in a terminal)."""
    return markdown_table(table_rows(sweep, rows), table_columns(sweep))


def outcome_text(sweep, outcome) -> str:
    """A finished sweep for the terminal (``cliplab sweep``, the demo): the table, chance levels,
    the sweep's own summary, the best trial, what was registered, the files and trial errors."""
    lines = [results_table(sweep, outcome.rows)]
    chance = chance_text(outcome.rows)
    if chance:
        lines.append(chance)
    summary = summary_text(sweep, outcome.rows) if outcome.summary is None else outcome.summary
    if summary:
        lines.append(summary)
    if outcome.best:
        lines.append(f"best trial: {outcome.best['trial']} ({sweep.metric} = {outcome.best[sweep.metric]:.4f})")
    if outcome.registered:
        reg = outcome.registered
        lines.append(f"registered: {reg['name']} version {reg['version']}, alias '{reg['alias']}' -> "
                     f"{reg['model_uri']}")
        if reg.get("decision"):
            lines.append(f"promotion: {reg['decision']}")
    if outcome.registration_error:
        lines.append(f"registration failed: {outcome.registration_error}")
    if outcome.files:
        lines.append(f"results: {outcome.files['md']} (and .csv, plots/)")
    lines += [f"trial error: {err}" for err in outcome.errors]
    return "\n".join(lines)


def chance_text(rows: list[dict[str, Any]]) -> str:
    """The val split's chance levels (retrieval R@1, zero-shot top-1), or "" when not reported."""
    if not rows or "val/retrieval_chance_R1" not in rows[0]:
        return ""
    r = rows[0]
    chance_zs = 1 / r["val/zeroshot_num_classes"] if r.get("val/zeroshot_num_classes") else None
    return (f"chance: R@1 = {r['val/retrieval_chance_R1']:.4f} ({int(r['val/num_samples'])} val pairs)"
            + (f", zero-shot = {chance_zs:.4f} ({int(r['val/zeroshot_num_classes'])} classes)" if chance_zs else ""))


def summary_text(sweep, rows: list[dict[str, Any]]) -> str:
    """The sweep's own ``summarize`` over the rows (e.g. mean ± std over seeds), or ""."""
    return sweep.summarize(rows) if sweep.summarize and rows else ""


def write_results(sweep, rows: list[dict[str, Any]], curves: dict[str, Any], out: Path,
                  summary: str | None = None) -> dict[str, Path]:
    """results.csv, results.md and the plots in ``out``; ``summary``: :func:`summary_text`, when
    the caller has it already (a sweep's summary may evaluate every checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    cols = table_columns(sweep)
    files = {"csv": out / "results.csv", "md": out / "results.md"}
    with files["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([label for label, _ in cols])
        for row in table_rows(sweep, rows):
            writer.writerow([row.get(key, "") for _, key in cols])
    hypothesis = (sweep.hypothesis or "").strip().splitlines()
    chance = chance_text(rows)
    summary = summary_text(sweep, rows) if summary is None else summary
    summary = f"\n{summary}\n" if summary else ""
    files["md"].write_text(f"# sweep {sweep.name}\n\n" + (f"{hypothesis[0]}\n\n" if hypothesis else "")
                           + results_table(sweep, rows) + "\n" + (f"\n{chance}\n" if chance else "") + summary)
    files.update(plot_all(sweep, rows, curves, out / "plots"))
    return files


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(sweep, rows: list[dict[str, Any]], curves: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    scored = [r for r in rows if isinstance(r.get(sweep.metric), (int, float))]
    for key in sweep.space:
        if scored:
            files[f"plot:{key}"] = plot_metric_vs(scored, key, sweep.metric, out / f"{sweep.metric.replace('/', '_')}"
                                                  f"_vs_{key.replace('.', '_')}.png")
    keys = list(sweep.space)
    if len(keys) == 2 and scored:
        files["plot:heatmap"] = plot_heatmap(scored, keys[0], keys[1], sweep.metric, out / "heatmap.png")
    if curves:
        files["plot:curves"] = plot_curves(curves, sweep.metric, out / "learning_curves.png")
    return files


def _positions(values: list) -> tuple[list[float], list[str] | None]:
    """Numbers stay numbers; anything else becomes categories at 0..n-1."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    cats = sorted({str(v) for v in values})
    return [float(cats.index(str(v))) for v in values], cats


def plot_metric_vs(rows, key: str, metric: str, path: Path) -> Path:
    plt = _pyplot()
    xs, cats = _positions([r.get(key) for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(xs, [r[metric] for r in rows])
    if cats:
        ax.set_xticks(range(len(cats)), cats, rotation=30)
    elif min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(rows, key_x: str, key_y: str, metric: str, path: Path) -> Path:
    """Mean metric per (x, y) cell, e.g. β × τ."""
    import numpy as np

    plt = _pyplot()
    xs = sorted({r.get(key_x) for r in rows}, key=str)
    ys = sorted({r.get(key_y) for r in rows}, key=str)
    grid = np.full((len(ys), len(xs)), np.nan)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            vals = [r[metric] for r in rows if r.get(key_x) == x and r.get(key_y) == y]
            if vals:
                grid[j, i] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.9 * len(ys) + 2.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [f"{x:.4g}" if isinstance(x, float) else str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:.4g}" if isinstance(y, float) else str(y) for y in ys])
    for j in range(len(ys)):
        for i in range(len(xs)):
            if not np.isnan(grid[j, i]):
                ax.text(i, j, f"{grid[j, i]:.3g}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel(key_x)
    ax.set_ylabel(key_y)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, Any], metric: str, path: Path) -> Path:
    """Training loss and the sweep metric against step, one line per trial."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, df in sorted(curves.items()):
        for ax, key in zip(axes, ("train/loss", metric), strict=True):
            if key in df.columns and "step" in df.columns:
                part = df[["step", key]].dropna()
                if len(part):
                    ax.plot(part["step"], part[key], marker="o", markersize=3, label=name)
    for ax, key in zip(axes, ("train/loss", metric), strict=True):
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
