"""Two papers' claims against CLIP at a matched budget, over 3 seeds: CLOOB and SigLIP.

Hypotheses:
- CLOOB (Fürst et al.): InfoLOOB with modern Hopfield retrieval beats CLIP's InfoNCE at zero-shot
  (RN50 on CC3M: 20.3 → 24.0 ImageNet top-1), because retrieval enriches the covariance structure
  and the leave-one-out bound avoids InfoNCE's saturation.
- SigLIP (Zhai et al.): the sigmoid loss beats softmax InfoNCE when the batch is small (its paper:
  below 16k; this sweep's global batch is 128), and matches it at large batches.

Every trial runs `cliplab.experiments.LIT_RECIPE` (a locked all-MiniLM-L6-v2 text tower, a tiny
ViT, lr 2e-3, 78 steps at batch 128) at each preset's own τ and β; only the objective and the seed
change. The summary gives each objective's mean ± std over the seeds and its difference from CLIP
with a Welch 95% interval, and the verdict that interval decides (`cliplab.report.versus`). On
another corpus: `--set data.train=… --set data.val=… --set data.label_key=…` (docs/RESULTS.md).
"""

from ray import tune

from cliplab.experiments import VAL_METRICS, emoji_base, lit
from cliplab.report import versus_table
from cliplab.tune import NoScheduler, Sweep

METRICS = VAL_METRICS


def summarize(rows: list[dict]) -> str:
    """Mean ± std per objective and each challenger's difference from CLIP, with its verdict."""
    return versus_table(rows, by="objective.name", baseline="clip", metrics=METRICS)


SWEEP = Sweep(
    base=lit(emoji_base("versus-clip")),
    space={
        "objective.name": tune.grid_search(["clip", "cloob", "siglip"]),
        "train.seed": tune.grid_search([0, 1, 2]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every trial gets the full budget
    summarize=summarize,
)
