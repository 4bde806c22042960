"""Demo sweep: at the same small budget, does every contrastive objective learn the emoji corpus?

Hypothesis: with a locked pretrained text tower (LiT: all-MiniLM-L6-v2) under a tiny ViT, every
preset learns within 156 steps (12 epochs): val R@1 well above chance both ways and emoji groups
above chance zero-shot. The locked tower's output is computed once per caption
(`model.cache_locked_text`), so epochs 2–12 run only the image tower and the text projection and
twice the steps of the plain recipe fit about the same time. Trained from scratch on both towers,
SigLIP and CLOOB collapsed at this lr (every embedding the same vector); the locked tower's spread text embeddings anchor one side, so no
preset needs a smaller lr (`cliplab.experiments.LIT_RECIPE` says what was measured). Each
objective runs at its preset's τ, β, λ and curvature (`../shared/objectives.md`) with the same lr,
steps, batch and seed. The metric is image→text R@1 on the val split; the best trial becomes
`cliplab-demo@champion`. Run `sweeps/shootout.py` for the 3-seed mean ± std version.

`cliplab demo` runs this file against the bundled emoji corpus on the local S3 server (after
embedding the captions for X-CLR); run it yourself on any corpus with
`cliplab sweep sweeps/demo.py --set data.train=... --set data.val=... --set data.caption_embeddings=...`.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import emoji_base, lit
from cliplab.tune import NoScheduler, Sweep

SWEEP = Sweep(
    base=with_overrides(lit(emoji_base("demo")), {"train.epochs": 12, "model.cache_locked_text": 100_000}),
    space={"objective.name": tune.grid_search(["clip", "siglip", "cloob", "meru", "xclr"])},
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every objective gets the full budget: no early stopping
    max_concurrent_trials=1,
    register_as="cliplab-demo",
)
