"""Experiment tracking: a :class:`Tracker` protocol with no-op, in-memory and MLflow versions, the
on-disk spool, run artifacts, and the MLflow model side (the pyfunc model, the registry).

May import: checkpoint, data, config, models, objectives and the foundations (redaction for every
param, tag and artifact). Never eval, train, tune, submit, demo or cli.
"""

from cliplab.tracking.tracker import InMemoryTracker, MlflowTracker, NoOpTracker, Tracker, build_tracker

__all__ = ["InMemoryTracker", "MlflowTracker", "NoOpTracker", "Tracker", "build_tracker"]
