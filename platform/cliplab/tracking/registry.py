"""Register a training checkpoint in the MLflow model registry, with an alias."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import cliplab


def model_signature():
    """Images (raw bytes; base64 strings over HTTP) and/or texts in; embeddings in the objective's
    geometry out, plus the image-text similarity of each row when both are given."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.binary, "image", required=False),
                     ColSpec(DataType.string, "text", required=False)])
    outputs = Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                      ColSpec(Array(DataType.double), "text_embedding", required=False),
                      ColSpec(DataType.double, "similarity", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def redact_config(checkpoint_dir: Path) -> None:
    """Rewrite a local checkpoint copy's ``config.json`` through the MLflow redactor, so a model
    version never carries a secret an older checkpoint kept (a password in tracking.uri)."""
    from cliplab.redaction import Redactor

    path = checkpoint_dir / "config.json"
    path.write_text(json.dumps(Redactor().tree(json.loads(path.read_text())), indent=2))


def write_open_clip_export(checkpoint_dir: Path, out: Path) -> Path:
    """An open_clip-compatible export of a checkpoint: ``model.pt`` (the state dict that
    ``open_clip.create_model(name, pretrained=path)`` loads) carrying the objective's trained
    ``logit_scale`` and, for a sigmoid objective, ``logit_bias``; the architecture's JSON config
    (with ``init_logit_bias`` when the export adds a bias the architecture lacks); the objective's
    scalars (``objective.pt``: τ, β, curvature, …) and a README saying how."""
    import shutil

    import open_clip
    import torch

    from cliplab.checkpoint import load_config, read_weights
    from cliplab.models import _register_bundled_configs, with_trained_temperature

    cfg = load_config(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_state, objective = read_weights(checkpoint_dir)
    state = with_trained_temperature(model_state, objective, add_bias=True)  # older checkpoints kept the initial ones
    torch.save(state, out / "model.pt")
    shutil.copyfile(checkpoint_dir / "objective.pt", out / "objective.pt")
    _register_bundled_configs()
    model_cfg = dict(open_clip.get_model_config(cfg.model.name))
    if "logit_bias" in state and "init_logit_bias" not in model_cfg:
        model_cfg["init_logit_bias"] = float(state["logit_bias"])  # so that open_clip builds the parameter
    (out / f"{cfg.model.name}.json").write_text(json.dumps(model_cfg, indent=2))
    (out / "README.md").write_text(
        f"# open_clip export ({cfg.objective.name} objective)\n\n"
        "```python\nimport open_clip\n"
        f"open_clip.add_model_config('{cfg.model.name}.json')  # this export's config"
        + (" (it adds init_logit_bias)" if "init_logit_bias" not in open_clip.get_model_config(cfg.model.name)
           and "logit_bias" in state else "") + "\n"
        f"model = open_clip.create_model('{cfg.model.name}', pretrained='model.pt')\n```\n\n"
        f"`logit_scale` is the trained log s (s = {float(state['logit_scale'].exp()):.4g})"
        + (f" and `logit_bias` the trained b ({float(state['logit_bias']):.4g})" if "logit_bias" in state else "")
        + ": open_clip's `get_logits` gives the objective's logits"
        + (". For a Lorentz (MERU) objective s scales the negative Lorentz distance, not the cosine, so "
           "open_clip's cosine logits with it are not the objective's." if "log_curvature" in objective else ".")
        + " `objective.pt` holds the objective's learned scalars (log temperature, Hopfield beta, curvature, "
        "...). Embeddings in the objective's geometry come from the registered MLflow pyfunc, which applies them.\n")
    return out


def register_checkpoint(checkpoint_path: str, name: str, alias: str | None, *, uri: str,
                        run_id: str | None = None, version_tags: dict[str, str] | None = None,
                        filesystem=None) -> dict[str, Any]:
    """Log the checkpoint as a pyfunc model (in ``run_id``'s run when given), register it as
    ``name`` with ``version_tags`` and, when given, point ``alias`` at the new version. Returns
    name, version, alias and model URI. ``filesystem``: the run's storage filesystem when the
    checkpoint is on S3 (Ray reports it as a bucket/key path on that filesystem)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from cliplab.checkpoint import fetch_checkpoint
    from cliplab.tracking.pyfunc import CliplabPyfunc
    from cliplab.tracking.tracker import quiet_run_links

    quiet_run_links(uri)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = str(fetch_checkpoint(checkpoint_path, Path(tmp) / "checkpoint", filesystem))
        redact_config(Path(local))  # a checkpoint written before config.json was redacted
        export = write_open_clip_export(Path(local), Path(tmp) / "open_clip")
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=f"register-{name}"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # type-hint and cloudpickle advice
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=CliplabPyfunc(),
                artifacts={"checkpoint": local},
                signature=model_signature(),
                input_example=pd.DataFrame({"text": ["an emoji of a red apple"]}),
                pip_requirements=[f"cliplab=={cliplab.__version__}"],
                registered_model_name=name,
            )
            mlflow.log_artifacts(str(export), "open_clip")
    client = MlflowClient(uri)
    version = info.registered_model_version
    from cliplab.redaction import Redactor

    for key, value in Redactor().params(version_tags or {}).items():  # as MLflow params and tags are
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": int(version), "alias": alias,
            "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}", "run_id": info.run_id}
