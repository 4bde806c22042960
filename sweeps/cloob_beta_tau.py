"""Which Hopfield β and inverse temperature make CLOOB beat CLIP on this corpus?

Hypothesis (the CLOOB paper's CC3M recipe): β = 8 with inverse temperature 30 beats a small β,
because retrieval averages each embedding over its neighbours and a larger β keeps that average
close to the query; as β → 0 every retrieved embedding collapses to the batch mean. The code
defaults (14.3 / 14.3) sit in the grid too. Compare against `sweeps/demo.py`'s CLIP trials.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import emoji_base
from cliplab.tune import ASHA, Sweep

SWEEP = Sweep(
    base=with_overrides(emoji_base("cloob-beta-tau"), {"objective.name": "cloob",
                                                       "train.eval_every_epoch": True}),
    space={
        "objective.hopfield_beta": tune.grid_search([2.0, 8.0, 14.3]),
        "objective.temperature": tune.grid_search([1 / 30, 1 / 14.3]),
    },
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=ASHA(grace_period=1, reduction_factor=2),  # val R@1 each epoch; the weak half stops early
)
