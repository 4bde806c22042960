"""How sharp should X-CLR's soft targets be?

Hypothesis: τ_s = 0.1 (the seed's value) beats both a near-hard target (τ_s = 0.02, back towards
SimCLR's one-hot) and a flat one (τ_s = 0.5, where unrelated captions get real weight). Needs the
caption embeddings: `cliplab data embed-captions .cliplab/demo/data/emoji/train`.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import emoji_base
from cliplab.tune import ASHA, Sweep

SWEEP = Sweep(
    base=with_overrides(emoji_base("xclr-target-temp"), {"objective.name": "xclr",
                                                       "train.eval_every_epoch": True}),
    space={"objective.soft_target_temperature": tune.grid_search([0.02, 0.1, 0.5])},
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=ASHA(grace_period=1, reduction_factor=2),  # val R@1 each epoch; the weak half stops early
)
