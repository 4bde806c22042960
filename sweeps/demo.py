"""Demo sweep: how do the CLIP temperature τ and the learning rate trade off on a small corpus?

Hypothesis: with few steps and a tiny model, a warmer start (τ = 0.07, CLIP's default) learns
faster than a sharp one (τ = 0.03), and the higher lr (2e-3) helps while the run is this short.
(A first run also tried lr = 5e-3: both of its trials collapsed to chance, loss = log(batch).)
The metric is image→text R@1 on the val split; the best trial becomes `cliplab-demo@champion`.

`cliplab demo` runs this file against the bundled emoji corpus on the local S3 server; run it
yourself on any corpus with `cliplab sweep sweeps/demo.py --set data.train=... --set data.val=...`.
"""

from ray import tune

from cliplab.experiments import emoji_base
from cliplab.tune import Sweep

SWEEP = Sweep(
    base=emoji_base("demo"),
    space={
        "objective.temperature": tune.grid_search([0.07, 0.03]),
        "optim.lr": tune.grid_search([1e-3, 2e-3]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    max_concurrent_trials=1,
    register_as="cliplab-demo",
)
