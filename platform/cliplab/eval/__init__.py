"""Evaluation written once against the objective interface.

Owns: the scoring of embeddings in the objective's geometry (the trainer's in-training eval and
``cliplab eval`` share it) and ``cliplab eval`` itself. May import: tracking, checkpoint, data,
the foundation modules (config, models, objectives, errors, ray_connect, redaction, ...); never
train, tune, submit, demo or cli.

- :mod:`cliplab.eval.metrics`, :mod:`cliplab.eval.scoring`, :mod:`cliplab.eval.lenses`: pure
  torch scoring. Ray-free, no I/O.
- :mod:`cliplab.eval.runner`: ``cliplab eval``: :func:`~cliplab.eval.runner.run_eval` over
  :mod:`~cliplab.eval.loading` (the model), :mod:`~cliplab.eval.sets` (eval sets),
  :mod:`~cliplab.eval.embedding` (Ray embedding) and :mod:`~cliplab.eval.report` (reports, MLflow).
"""

from cliplab.eval.metrics import retrieval_metrics, zero_shot_report
from cliplab.eval.scoring import evaluate_embeddings, evaluate_module

__all__ = ["evaluate_embeddings", "evaluate_module", "retrieval_metrics", "zero_shot_report"]
