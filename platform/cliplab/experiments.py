"""Shared experiment bases that sweep files start from (experiments as code)."""

from __future__ import annotations

from cliplab.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
)


def emoji_base(name: str = "demo") -> ExperimentConfig:
    """The emoji corpus as `cliplab demo` lays it out, a tiny ViT, 2 CPU workers, 4 epochs.
    Point it elsewhere with `--set data.train=... --set data.val=...`."""
    return ExperimentConfig(
        name=name,
        data=DataConfig(train=".cliplab/demo/data/emoji/train", val=".cliplab/demo/data/emoji/val",
                        batch_size=64, label_key="group",
                        caption_embeddings=".cliplab/demo/data/emoji/train/caption-embeddings"),
        model=ModelConfig(name="cliplab-tiny"),
        objective=ObjectiveConfig(name="clip", temperature=0.07),
        optim=OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=10),
        train=TrainConfig(epochs=4, num_workers=2, cpus_per_worker=0.5, checkpoint_every=100,
                          eval_every_epoch=False),
        eval=EvalConfig(templates=("an emoji of {}.", "{}")),
        tracking=TrackingConfig(experiment="cliplab-demo"),
    )
