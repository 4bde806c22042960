"""Which Hopfield β and inverse temperature 1/τ suit CLOOB at this scale, over 3 seeds?

Hypothesis (the CLOOB paper's CC3M recipe): β = 8 with 1/τ = 30 beats a small β, because retrieval
averages each embedding over its neighbours and a larger β keeps that average close to the query;
as β → 0 every retrieved embedding tends to the batch mean. The code defaults (β = 14.3,
1/τ = 14.3) sit in the grid too.

Every trial runs `cliplab.experiments.LIT_RECIPE` (a locked all-MiniLM-L6-v2 text tower, a tiny
ViT, lr 2e-3, 78 steps at batch 128), CLOOB with τ fixed, so only β, τ and the seed change. The
summary gives each (β, 1/τ) cell's mean ± std over the seeds and its difference from the paper's
cell (β 8, 1/τ 30) with a Welch 95% interval: a verdict of *holds* means that cell beats the
paper's, *does not hold at this scale* that it trails it (`cliplab.report.versus`). CLIP on the same
recipe and seeds is `sweeps/versus_clip.py`'s baseline. On another corpus:
`--set data.train=… --set data.val=… --set data.label_key=…` (docs/RESULTS.md).
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import VAL_METRICS, emoji_base, lit
from cliplab.report import versus_table
from cliplab.tune import NoScheduler, Sweep

BETAS = [2.0, 8.0, 14.3]
INVERSE_TEMPERATURES = [14.3, 30.0]
PAPER = "β 8, 1/τ 30"
CELL = "β, 1/τ"


def cell(row: dict) -> str:
    """A trial's grid cell as the summary names it, e.g. ``β 8, 1/τ 30``."""
    return f"β {row['objective.hopfield_beta']:g}, 1/τ {1 / row['objective.temperature']:.3g}"


def summarize(rows: list[dict]) -> str:
    """Mean ± std per (β, 1/τ) cell and each cell's difference from the paper's, with its verdict."""
    return versus_table([{**r, CELL: cell(r)} for r in rows], by=CELL, baseline=PAPER, metrics=VAL_METRICS)


SWEEP = Sweep(
    base=with_overrides(lit(emoji_base("cloob-beta-tau")), {"objective.name": "cloob",
                                                            "objective.learn_temperature": False}),
    space={
        "objective.hopfield_beta": tune.grid_search(BETAS),
        "objective.temperature": tune.grid_search([1 / s for s in INVERSE_TEMPERATURES]),
        "train.seed": tune.grid_search([0, 1, 2]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every cell gets the full budget: a grid over seeds, not a search
    summarize=summarize,
)
