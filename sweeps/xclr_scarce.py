"""X-CLR against CLIP as data gets scarce: 10%, 30% and 100% of the training pairs, over 3 seeds.

Hypothesis (Sobal et al., X-CLR): soft targets from a frozen sentence encoder's caption
similarities help most when data is scarce, because each image also learns from the captions of
its neighbours; with all the data CLIP catches up. So X-CLR − CLIP should be largest at 10%.

Every trial runs `cliplab.experiments.LIT_RECIPE` for the same 78 steps at batch 128 (a small
fraction is seen for more epochs), with X-CLR's soft targets image → text; only the objective,
`data.train_fraction` (a nested, deterministic subset) and the seed change. Needs the caption
embeddings (`cliplab data embed-captions TRAIN`). The summary gives, per fraction, each
objective's mean ± std and X-CLR's difference from CLIP with a Welch 95% interval and its verdict.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import VAL_METRICS, emoji_base, lit
from cliplab.report import versus_table
from cliplab.tune import NoScheduler, Sweep

METRICS = VAL_METRICS


def summarize(rows: list[dict]) -> str:
    """Per training fraction: X-CLR against CLIP (plain Python over the trial rows)."""
    parts = []
    for fraction in sorted({r["data.train_fraction"] for r in rows}):
        at = [r for r in rows if r["data.train_fraction"] == fraction]
        parts.append(f"data.train_fraction = {fraction:g}\n\n"
                     + versus_table(at, by="objective.name", baseline="clip", metrics=METRICS))
    return "\n\n".join(parts)


SWEEP = Sweep(
    base=with_overrides(lit(emoji_base("xclr-scarce")), {"train.epochs": 1000, "train.max_steps": 78}),
    space={
        "objective.name": tune.grid_search(["clip", "xclr"]),
        "data.train_fraction": tune.grid_search([0.1, 0.3, 1.0]),
        "train.seed": tune.grid_search([0, 1, 2]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every trial gets the full budget
    summarize=summarize,
)
