"""Shootout: every preset at the same budget, over 3 seeds.

Hypothesis: on a small corpus and a short budget the objectives that add structure (CLOOB's
retrieval, X-CLR's soft targets) beat plain CLIP on retrieval, while MERU matches CLIP on retrieval
and SigLIP trails slightly at this batch size. The summary reports mean ± std over seeds of val
R@1 (both directions) and zero-shot top-1 per objective, so one lucky seed can't decide it.
Every trial runs `cliplab.experiments.LIT_RECIPE`, the demo's recipe (`sweeps/demo.py`). X-CLR
needs `cliplab data embed-captions` on the train shards first.
"""

import statistics

from ray import tune

from cliplab.experiments import VAL_METRICS, emoji_base, lit
from cliplab.report import markdown_table
from cliplab.tune import NoScheduler, Sweep

METRICS = VAL_METRICS


def summarize(rows: list[dict]) -> str:
    """Mean ± std over seeds, one row per objective (plain Python over the trial rows)."""
    out = []
    for objective in sorted({r["objective.name"] for r in rows}):
        runs = [r for r in rows if r["objective.name"] == objective]
        row = {"objective": objective, "seeds": len(runs)}
        for label, key in METRICS.items():
            values = [r[key] for r in runs if isinstance(r.get(key), float)]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[label] = f"{statistics.mean(values):.4f} ± {std:.4f}"
        out.append(row)
    return markdown_table(out, [("objective", "objective"), ("seeds", "seeds")] + [(m, m) for m in METRICS])


SWEEP = Sweep(
    base=lit(emoji_base("shootout")),
    space={
        "objective.name": tune.grid_search(["clip", "siglip", "cloob", "meru", "xclr"]),
        "train.seed": tune.grid_search([0, 1, 2]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every objective gets the full budget: no early stopping
    summarize=summarize,
)
