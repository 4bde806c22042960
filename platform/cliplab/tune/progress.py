"""A sweep's own progress: one line when a trial starts and one when it ends, instead of Ray
Tune's status table every 30 s and a result table per trial (``Sweep.tune_verbose`` brings those
back). The trials' workers add one line per epoch (``cliplab.train.worker``)."""

from __future__ import annotations

import time
from typing import Any

from ray import tune


def _params(trial, keys) -> str:
    return ", ".join(f"{k}={trial.config.get(k)}" for k in keys) or "-"


class TrialLines(tune.Callback):
    """``trial 2/5 started: objective.name=siglip`` and ``trial 2/5 done in 64 s: step 52,
    val/image_to_text_R1 0.0423`` (or its error), with the sweep's metric."""

    def __init__(self, keys, metric: str, total: int) -> None:
        self.keys, self.metric, self.total = list(keys), metric, total
        self.started: dict[str, float] = {}
        self.numbers: dict[str, int] = {}

    def _label(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number}/{self.total} ({trial.trial_id})"

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())
        print(f"{self._label(trial)} started: {_params(trial, self.keys)}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        print(f"{self._label(trial)} done in {self._elapsed(trial):.0f} s: step {result.get('step', '?')}, {shown}",
              flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        print(f"{self._label(trial)} failed after {self._elapsed(trial):.0f} s (see the sweep's error summary)",
              flush=True)

    def _elapsed(self, trial) -> float:
        return time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
