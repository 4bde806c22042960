"""Evaluation written once against the objective interface. Ray-free."""

from cliplab.eval.metrics import evaluate_embeddings, retrieval_metrics, zero_shot_accuracy

__all__ = ["evaluate_embeddings", "retrieval_metrics", "zero_shot_accuracy"]
