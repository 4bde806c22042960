"""Experiment tracking: a :class:`Tracker` protocol with no-op, in-memory and MLflow versions."""

from cliplab.tracking.tracker import InMemoryTracker, MlflowTracker, NoOpTracker, Tracker, build_tracker

__all__ = ["InMemoryTracker", "MlflowTracker", "NoOpTracker", "Tracker", "build_tracker"]
