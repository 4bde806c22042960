"""Sweeps as code: a sweep file defines ``SWEEP = Sweep(...)``; :func:`run_sweep` runs it on Tune.
Also the sweep's capacity wait, its parent MLflow run, promotion of the best trial and its report
(the one sweep table, :mod:`cliplab.tune.report`).

May import: train, eval, tracking, checkpoint, data, config and below. Never submit, demo or cli.
"""

from cliplab.tune.sweep import ASHA, NoScheduler, Optuna, RandomSearch, Sweep, SweepOutcome, load_sweep, run_sweep

__all__ = ["ASHA", "NoScheduler", "Optuna", "RandomSearch", "Sweep", "SweepOutcome", "load_sweep", "run_sweep"]
