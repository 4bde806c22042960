"""Plain-text tables for the terminal (and Markdown files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` = (header, row key). Aligned so it reads well in a terminal too."""
    cells = [[h for h, _ in columns]] + [[_fmt(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def versus(rows: Sequence[dict[str, Any]], *, by: str, baseline: Any, metric: str,
           confidence: float = 0.95) -> list[dict[str, Any]]:
    """Each value of ``rows[*][by]`` against ``baseline`` on ``metric``, over the rows (seeds) each
    has: n, mean ± std, the difference of means and its Welch ``confidence`` interval, and a
    verdict on "beats the baseline": *holds* (the interval is above 0), *does not hold at this
    scale* (below 0) or *inconclusive* (it straddles 0, or fewer than 2 seeds a side)."""
    import math
    import statistics

    from scipy import stats

    groups: dict[Any, list[float]] = {}
    for r in rows:  # a missing or undefined (NaN, inf) value is left out of its group's n
        if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]):
            groups.setdefault(r.get(by), []).append(float(r[metric]))
    base = groups.get(baseline, [])
    out = []
    for value, xs in groups.items():
        row = {by: value, "n": len(xs), "mean": statistics.mean(xs),
               "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        if value != baseline and len(xs) > 1 and len(base) > 1:
            va, vb = row["std"] ** 2 / len(xs), statistics.stdev(base) ** 2 / len(base)
            diff, se = row["mean"] - statistics.mean(base), (va + vb) ** 0.5
            df = (va + vb) ** 2 / ((va ** 2 / (len(xs) - 1) + vb ** 2 / (len(base) - 1)) or 1e-300)
            half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se if se > 0 else 0.0
            low, high = diff - half, diff + half
            verdict = "holds" if low > 0 else "does not hold at this scale" if high < 0 else "inconclusive"
            row.update(diff=diff, low=low, high=high, verdict=verdict)
        elif value != baseline:
            row["verdict"] = "inconclusive"
        out.append(row)
    return out


def versus_table(rows: Sequence[dict[str, Any]], *, by: str, baseline: Any, metrics: dict[str, str]) -> str:
    """:func:`versus` for several metrics (label → row key) as one Markdown table."""
    ci = f"− {baseline} (95% CI)"
    lines = []
    for label, metric in metrics.items():
        for r in versus(rows, by=by, baseline=baseline, metric=metric):
            lines.append({"metric": label, by: r[by], "seeds": r["n"], "mean ± std": f"{r['mean']:.4f} ± {r['std']:.4f}",
                          ci: f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]" if "diff" in r else "-",
                          "verdict": r.get("verdict", "(baseline)")})
    return markdown_table(lines, [(key, key) for key in ("metric", by, "seeds", "mean ± std", ci, "verdict")])
