"""Ray Tune's OptunaSearch for cliplab trials, which report before their first eval."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class MetricOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch reads the sweep's metric from every intermediate result (a KeyError otherwise);
    a cliplab trial also reports at checkpoints and log steps, before any eval. Those results carry
    nothing for Optuna and are skipped; results with the metric go to Optuna's pruning reports."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
