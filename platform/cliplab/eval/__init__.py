"""Evaluation written once against the objective interface.

- :mod:`cliplab.eval.metrics`, :mod:`cliplab.eval.scoring`, :mod:`cliplab.eval.lenses`: pure
  torch scoring (the trainer's in-training eval and ``cliplab eval`` share it). Ray-free.
- :mod:`cliplab.eval.templates`: prompt templates shipped with cliplab.
- :mod:`cliplab.eval.runner`: ``cliplab eval`` (model loading, eval sets, Ray embedding, reports).
"""

from cliplab.eval.metrics import (
    evaluate_embeddings,
    evaluate_module,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_report,
)

__all__ = ["evaluate_embeddings", "evaluate_module", "retrieval_metrics", "zero_shot_accuracy", "zero_shot_report"]
