"""Does the entailment-cone weight λ matter for MERU?

Hypothesis: retrieval barely moves with λ ∈ [0, 0.2] (the cones shape the hierarchy, not the
pairwise ranking), while the entailment satisfaction rate and texts sitting nearer the origin than
images need λ > 0. λ = 0 is MERU's contrastive loss alone in Lorentz geometry.
"""

from ray import tune

from cliplab.config import with_overrides
from cliplab.experiments import emoji_base
from cliplab.tune import ASHA, Sweep

SWEEP = Sweep(
    base=with_overrides(emoji_base("meru-entailment"), {"objective.name": "meru",
                                                       "train.eval_every_epoch": True}),
    space={"objective.entailment_weight": tune.grid_search([0.0, 0.05, 0.2, 0.5])},
    metric="val/image_to_text_R1",
    mode="max",
    scheduler=ASHA(grace_period=1, reduction_factor=2),  # val R@1 each epoch; the weak half stops early
)
