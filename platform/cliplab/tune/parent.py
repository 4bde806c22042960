"""The sweep's MLflow parent run: trials are its children (``mlflow.parentRunId``), so MLflow's
run comparison shows a sweep as one expandable row. It holds the hypothesis, the search space,
the results table, the plots and the best trial's metric."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cliplab.tracking.tracker import tracking_uri


@dataclass
class ParentRun:
    uri: str | None
    run_id: str | None

    @classmethod
    def open(cls, sweep, sweep_path: str, *, resume: bool) -> ParentRun:
        """A new parent run, or on resume the one the interrupted sweep created."""
        uri = tracking_uri(sweep.base.tracking)
        if not uri:
            return cls(None, None)
        from mlflow import MlflowClient

        from cliplab.checkpoint import run_storage
        from cliplab.redaction import Redactor

        # beside the sweep's Tune state, local or on S3, so that --resume finds it wherever it runs
        filesystem, root = run_storage(sweep_path, sweep.base.data.s3)
        marker = f"{root}/mlflow_parent_run.json"
        client = MlflowClient(uri)
        if resume:
            try:
                with filesystem.open_input_stream(marker) as f:
                    return cls(uri, json.loads(f.read())["run_id"])
            except FileNotFoundError:
                pass
        exp = client.get_experiment_by_name(sweep.base.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(sweep.base.tracking.experiment)
        tags = {"sweep": sweep.name, "cliplab.kind": "sweep", "mlflow.note.content": sweep.hypothesis or ""}
        run = client.create_run(exp_id, run_name=f"sweep-{sweep.name}", tags=tags)
        redact = Redactor()
        params = {f"space.{k}": str(v)[:500] for k, v in sweep.space.items()}
        params.update({"sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.trials": sweep.num_trials,
                       "sweep.scheduler": type(sweep.scheduler).__name__})
        from cliplab.tracking.spool import log_params_batched

        log_params_batched(client, run.info.run_id, redact.params(params))
        filesystem.create_dir(root, recursive=True)
        with filesystem.open_output_stream(marker) as f:
            f.write(json.dumps({"run_id": run.info.run_id}).encode())
        return cls(uri, run.info.run_id)

    def finish(self, sweep, rows, best, files: dict[str, Path], registered) -> None:
        if not self.run_id:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        for key, path in files.items():
            client.log_artifact(self.run_id, str(path), "plots" if key.startswith("plot:") else None)
        if best is not None:
            client.log_metric(self.run_id, f"best/{sweep.metric}", float(best[sweep.metric]))
            client.set_tag(self.run_id, "best_trial", best["trial"])
        client.log_metric(self.run_id, "trials", float(len(rows)))
        if registered:
            client.set_tag(self.run_id, "registered", f"{registered['name']} v{registered['version']} "
                                                      f"@{registered['alias']}")
        client.set_terminated(self.run_id, "FINISHED")
