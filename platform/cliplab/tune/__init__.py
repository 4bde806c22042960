"""Sweeps as code: a sweep file defines ``SWEEP = Sweep(...)``; :func:`run_sweep` runs it on Tune."""

from cliplab.tune.sweep import ASHA, NoScheduler, Optuna, RandomSearch, Sweep, SweepOutcome, load_sweep, run_sweep

__all__ = ["ASHA", "NoScheduler", "Optuna", "RandomSearch", "Sweep", "SweepOutcome", "load_sweep", "run_sweep"]
