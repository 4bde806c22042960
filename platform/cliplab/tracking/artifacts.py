"""What every run records besides metrics: provenance params, the resolved config, the eval
report and plots. Pure helpers; the trainer decides when to call them."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def git_sha(cwd: str | Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), ``CLIPLAB_GIT_SHA`` when
    set (cluster jobs ship no ``.git``), else ``unknown``."""
    if os.environ.get("CLIPLAB_GIT_SHA"):
        return os.environ["CLIPLAB_GIT_SHA"]
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """``git.sha`` and the versions of the packages that decide a result."""
    import importlib.metadata as md
    import platform as stdlib_platform

    out = {"git.sha": git_sha(), "version.python": stdlib_platform.python_version()}
    for dist, key in (("torch", "torch"), ("ray", "ray"), ("open_clip_torch", "open_clip"),
                      ("cliplab", "cliplab"), ("mlflow", "mlflow")):
        try:
            out[f"version.{key}"] = md.version(dist)
        except md.PackageNotFoundError:
            out[f"version.{key}"] = "not installed"
    return out


def write_config(config: dict[str, Any], folder: Path) -> list[Path]:
    """The resolved config as ``config.yaml`` and ``config.json`` (what ``cliplab train`` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "config.yaml", folder / "config.json"]
    paths[0].write_text(yaml.safe_dump(config, sort_keys=False))
    paths[1].write_text(json.dumps(config, indent=2))
    return paths


def write_eval_report(metrics: dict[str, float], folder: Path, *, title: str = "eval") -> list[Path]:
    """``eval_report.json`` and a Markdown table of the ``val/`` metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    vals = {k: float(v) for k, v in sorted(metrics.items()) if k.startswith("val/")}
    paths = [folder / "eval_report.json", folder / "eval_report.md"]
    paths[0].write_text(json.dumps(vals, indent=2))
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in vals.items()]
    paths[1].write_text("\n".join(lines) + "\n")
    return paths


def plot_curves(history: Sequence[tuple[int, dict[str, float]]], path: Path,
                keys: Sequence[str] | None = None, title: str = "") -> Path | None:
    """Learning curves (one panel per metric) from ``(step, metrics)`` records, as a PNG.
    Returns None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys) if keys else sorted({k for _, m in history for k in m
                                           if k.startswith(("train/loss", "val/", "scalars/"))})
    series = {k: [(s, m[k]) for s, m in history if k in m] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    cols = min(3, len(series))
    rows = (len(series) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items(), strict=False):
        steps, values = zip(*points, strict=False)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
