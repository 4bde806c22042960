"""MERU's claims, and what its entailment-cone weight λ does, over 3 seeds.

Hypotheses (Desai et al., MERU):
- texts sit nearer the root of the hyperboloid than images (the generic entails the specific);
- an image's traversal toward [ROOT] retrieves ever more generic texts (on the emoji corpus:
  steps that move from an emoji's own subgroup up to its group);
- the entailment loss (λ > 0) shapes that hierarchy without costing retrieval; λ = 0 is MERU's
  contrastive loss alone in Lorentz geometry.

Every trial runs `cliplab.experiments.LIT_RECIPE` (a locked all-MiniLM-L6-v2 text tower, a tiny
ViT, lr 2e-3, 78 steps at batch 128) with MERU at λ = 0, 0.2 (MERU's default) and 0.5; only λ
and the seed change. After the sweep, the summary evaluates every trial's final checkpoint on the
val split through `cliplab eval`'s code (the lenses: origin distances, the share of pairs whose
text is nearer the origin, the entailment rate; on sets with a group/subgroup hierarchy, the image
traversals) and gives each λ's mean ± std and its difference from λ = 0 with a Welch 95% interval.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import VAL_METRICS, emoji_base, lit
from cliplab.report import versus_table
from cliplab.tune import NoScheduler, Sweep

LENSES = {
    "image origin distance": "lens/origin_distance_image",
    "text origin distance": "lens/origin_distance_text",
    "text nearer the origin (share of pairs)": "lens/text_nearer_origin_rate",
    "entailment rate": "lens/entailment_rate",
    "traversal steps specific → generic": "traversal/specific_to_generic",
    "traversal ancestor precision": "traversal/ancestor_precision",
}


def with_lenses(rows: list[dict]) -> list[dict]:
    """Each row with its trial's final checkpoint's lens metrics on the val split it trained
    against (``cliplab eval``'s code, in this process)."""
    import tempfile

    from cliplab.checkpoint import load_config
    from cliplab.eval.runner import run_eval

    out = []
    for row in rows:
        ckpt = row.get("checkpoint_path")
        if not ckpt:
            continue
        cfg = load_config(ckpt)
        with tempfile.TemporaryDirectory() as tmp:
            report = run_eval(ckpt, [cfg.data.val], out_dir=tmp, use_ray=False, progress=False, s3cfg=cfg.data.s3)
        metrics = report["datasets"][0]["metrics"]
        out.append({**row, **{key: metrics.get(key) for key in LENSES.values()}})
    return out


def summarize(rows: list[dict]) -> str:
    """Val retrieval and the lenses per λ, each against λ = 0 (plain Python over the trials)."""
    rows = with_lenses(rows)
    by = "objective.entailment_weight"
    return (versus_table(rows, by=by, baseline=0.0, metrics=VAL_METRICS) + "\n\nlenses on the val split\n\n"
            + versus_table(rows, by=by, baseline=0.0, metrics=LENSES))


SWEEP = Sweep(
    base=with_overrides(lit(emoji_base("meru-entailment")), {"objective.name": "meru"}),
    space={
        "objective.entailment_weight": tune.grid_search([0.0, 0.2, 0.5]),
        "train.seed": tune.grid_search([0, 1, 2]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every trial gets the full budget
    summarize=summarize,
)
