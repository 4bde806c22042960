"""Demo sweep: at the same small budget, which contrastive objective learns the emoji corpus best?

Hypothesis: with a tiny ViT and a few hundred steps, the objectives differ in how fast they pick
up the coarse structure. X-CLR's soft targets (captions' sentence-encoder similarities) and
CLOOB's Hopfield retrieval should help zero-shot over emoji groups, where many captions share a
group; SigLIP's sigmoid pairs and MERU's hyperbolic cones should match CLIP on retrieval R@1.
Each objective runs at its preset defaults (τ, β, λ, curvature from `../shared/objectives.md`) and
the same lr, steps, batch and seed. The metric is image→text R@1 on the val split; the best trial
becomes `cliplab-demo@champion`. Run `sweeps/shootout.py` for the 3-seed mean ± std version.

`cliplab demo` runs this file against the bundled emoji corpus on the local S3 server (after
embedding the captions for X-CLR); run it yourself on any corpus with
`cliplab sweep sweeps/demo.py --set data.train=... --set data.val=... --set data.caption_embeddings=...`.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import emoji_base
from cliplab.tune import NoScheduler, Sweep

SWEEP = Sweep(
    # preset temperatures (None) instead of the base's CLIP τ, and the lr the earlier τ × lr demo
    # grid picked (2e-3 beat 1e-3 at every τ; 5e-3 collapsed to chance)
    base=with_overrides(emoji_base("demo"), {"objective.temperature": None, "optim.lr": 2e-3}),
    space={"objective.name": tune.grid_search(["clip", "siglip", "cloob", "meru", "xclr"])},
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=NoScheduler(),  # every objective gets the full budget: no early stopping
    max_concurrent_trials=1,
    register_as="cliplab-demo",
)
