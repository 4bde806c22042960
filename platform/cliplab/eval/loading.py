"""``cliplab eval``'s model: ``models:/NAME@ALIAS`` from the MLflow registry (the pyfunc's
checkpoint artifact) or a checkpoint folder, local or ``s3://`` (the :mod:`cliplab.checkpoint`
layout, or a run folder: its latest complete checkpoint), loaded by
:func:`cliplab.checkpoint.load_module`, the pyfunc model's loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliplab.errors import ConfigError


@dataclass
class LoadedModel:
    """A model ready for eval: the :class:`cliplab.models.DualEncoder` (open_clip model +
    objective) in eval mode, its bundle (transforms, tokenizer) and the experiment config."""

    module: Any
    bundle: Any
    cfg: Any
    source: str

    @property
    def objective(self):
        return self.module.objective

    @property
    def device(self) -> torch.device:
        from cliplab.models import model_device

        return model_device(self.module)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Raw (unnormalised) text features, on the model's device."""
        from cliplab.models import encode_texts

        out = [encode_texts(self.module.model, self.bundle.tokenizer, texts[i:i + batch_size])
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0, self.bundle.embed_dim, device=self.device)


def _load_checkpoint(path: Path, source: str) -> LoadedModel:
    from cliplab.checkpoint import (
        IncompleteCheckpointError,
        UnsafeCheckpointError,
        is_complete,
        latest_checkpoint,
        load_module,
    )

    if not is_complete(path):
        latest = latest_checkpoint(path) if path.is_dir() else None
        if latest is None:
            raise ConfigError(f"--model {source}: not a complete checkpoint folder (no COMPLETE marker, no "
                              "checkpoint_* inside); pass a checkpoint written by cliplab train, a run folder, "
                              "or models:/NAME@ALIAS")
        path = latest
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # open_clip warns that a random init has no pretrained weights
        loaded = load_module(path)  # the pyfunc model's loader too: config.json → model + objective, weights
    except (IncompleteCheckpointError, UnsafeCheckpointError, FileNotFoundError) as err:
        raise ConfigError(f"--model {source}: {err}") from None
    finally:
        root.setLevel(level)
    return LoadedModel(loaded.module, loaded.bundle, loaded.cfg, source)


def _load_from_s3(ref: str) -> LoadedModel:
    """A checkpoint or run folder (its latest complete checkpoint) under an ``s3://`` storage_path;
    endpoint and keys from the AWS_* environment."""
    import tempfile

    from pyarrow import fs

    from cliplab.checkpoint import MARKER, fetch_checkpoint, latest_in_storage, run_storage

    try:
        filesystem, path = run_storage(ref)
        if filesystem.get_file_info(f"{path}/{MARKER}").type != fs.FileType.File:
            found = latest_in_storage(ref)
            if found is None:
                raise ConfigError(f"--model {ref}: no complete checkpoint there (no COMPLETE marker, no "
                                  "checkpoint_* inside); pass a checkpoint or run folder written by cliplab train")
            path = found[1]
        with tempfile.TemporaryDirectory(prefix="cliplab-eval-model-") as tmp:
            return _load_checkpoint(fetch_checkpoint(path, Path(tmp) / "checkpoint", filesystem), ref)
    except OSError as err:
        from cliplab.data.sources import s3_error_message

        raise ConfigError(f"--model: {s3_error_message(err, ref)}") from None


def load_model(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) from the MLflow registry at
    ``tracking_uri``, or a checkpoint/run folder, local or ``s3://``. Raises :class:`ConfigError`
    saying what to pass."""
    if ref.startswith("s3://"):
        return _load_from_s3(ref)
    if not ref.startswith("models:/"):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ConfigError(f"--model {ref}: no such checkpoint folder; pass a checkpoint folder or "
                              "models:/NAME@ALIAS (with --tracking-uri)")
        return _load_checkpoint(path, ref)
    if not tracking_uri:
        raise ConfigError(f"--model {ref} needs the MLflow registry: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="cliplab-eval-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp,
                                                             tracking_uri=tracking_uri))
        except MlflowException as err:
            raise ConfigError(f"--model {ref}: {str(err).splitlines()[0]} (see `cliplab registry list`)") from None
        found = [p.parent for p in local.rglob("COMPLETE")]
        if not found:
            raise ConfigError(f"--model {ref} is not a cliplab model (no checkpoint artifact inside)")
        return _load_checkpoint(found[0], ref)
