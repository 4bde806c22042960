"""Register a training checkpoint in the MLflow model registry, with an alias."""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import cliplab


def register_checkpoint(checkpoint_path: str, name: str, alias: str, *, uri: str,
                        run_id: str | None = None) -> dict[str, Any]:
    """Log the checkpoint as a pyfunc model (in ``run_id``'s run when given), register it as
    ``name`` and point ``alias`` at the new version. Returns name, version, alias and model URI."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from ray.train import Checkpoint

    from cliplab.tracking.pyfunc import CliplabPyfunc

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Checkpoint(checkpoint_path).to_directory(tmp)
        example = pd.DataFrame({"text": ["an example caption"]})
        signature = infer_signature(example, pd.DataFrame({"text_embedding": [[0.0, 1.0]]}))
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=f"register-{name}"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # type-hint and cloudpickle advice
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=CliplabPyfunc(),
                artifacts={"checkpoint": local},
                signature=signature,
                pip_requirements=[f"cliplab=={cliplab.__version__}"],
                registered_model_name=name,
            )
    client = MlflowClient(uri)
    version = info.registered_model_version
    client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": int(version), "alias": alias,
            "model_uri": f"models:/{name}@{alias}", "run_id": info.run_id}
