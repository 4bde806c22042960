"""Checkpoint directory layout, shared by training, resume and the model registry.

    model.pt       open_clip state dict (loadable by ``open_clip.create_model(name, pretrained=...)``)
    objective.pt   the objective's scalars
    trainer.pt     optimizer, scheduler, step, epoch, RNG states (torch, CUDA, numpy, python),
                   the MLflow run id (a restart continues the same run)
    config.json    the resolved experiment config
    COMPLETE       written last, atomically: a folder without it is a torn write and is never loaded

(bf16 autocast needs no gradient scaler, so there is no scaler state.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cliplab.config import ExperimentConfig, from_dict, to_dict

MARKER = "COMPLETE"


class IncompleteCheckpointError(RuntimeError):
    pass


def save_checkpoint(path: Path, module, optimizer, scheduler, *, step: int, epoch: int,
                    cfg: ExperimentConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write every file, then the ``COMPLETE`` marker (via rename, so it is all-or-nothing)."""
    import random

    import numpy as np

    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    torch.save(module.model.state_dict(), path / "model.pt")
    torch.save(module.objective.state_dict(), path / "objective.pt")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": epoch, "rng": rng, **(extra or {})}, path / "trainer.pt")
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "epoch": epoch}))
    tmp.replace(path / MARKER)
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _require_complete(path: Path) -> None:
    if not is_complete(path):
        raise IncompleteCheckpointError(f"{path} is an incomplete checkpoint (no {MARKER} marker: the writer "
                                        "died mid-write); use an earlier checkpoint")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under a local run folder (``checkpoint_*``)."""
    found = latest_in_storage(str(run_dir))
    return Path(found[1]) if found else None


def run_storage(uri: str, s3cfg=None):
    """``(pyarrow filesystem, path on it)`` for a folder under ``storage_path``: ``s3://`` through
    cliplab's S3 filesystem (the endpoint override pyarrow needs), anything else the local disk."""
    from pyarrow import fs

    if uri.startswith("s3://"):
        from cliplab.config import S3Config
        from cliplab.data.sources import s3_filesystem

        return s3_filesystem(s3cfg or S3Config()), uri[len("s3://"):].rstrip("/")
    return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def latest_in_storage(run_uri: str, s3cfg=None) -> tuple[Any, str] | None:
    """:func:`latest_checkpoint` for a run folder on local disk or S3: ``(filesystem, path)`` of
    its complete checkpoint with the highest step, or None."""
    from pyarrow import fs

    filesystem, root = run_storage(run_uri, s3cfg)
    found = []
    for info in filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)):
        if info.type != fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        marker = f"{info.path}/{MARKER}"
        if filesystem.get_file_info(marker).type != fs.FileType.File:
            continue  # a torn write: never loaded
        with filesystem.open_input_stream(marker) as f:
            found.append((json.loads(f.read())["step"], info.path))
    return (filesystem, max(found)[1]) if found else None


def read_config(filesystem, path: str) -> ExperimentConfig:
    """:func:`load_config` of a checkpoint on a pyarrow filesystem, without copying the rest."""
    with filesystem.open_input_stream(f"{path}/config.json") as f:
        return from_dict(ExperimentConfig, json.loads(f.read()))


def fetch_checkpoint(path: str, dest: Path, filesystem=None) -> Path:
    """A checkpoint as a local folder: ``path`` as Ray Train reports it (on ``filesystem``, the
    run's storage filesystem; local when None), copied to ``dest``."""
    from ray.train import Checkpoint

    return Path(Checkpoint(path, filesystem=filesystem).to_directory(str(dest)))


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    rng = state.get("rng")
    if not isinstance(rng, dict):
        return
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_config(path: Path) -> ExperimentConfig:
    return from_dict(ExperimentConfig, json.loads((Path(path) / "config.json").read_text()))


def load_weights(path: Path, module) -> None:
    _require_complete(path)
    module.model.load_state_dict(torch.load(Path(path) / "model.pt", map_location="cpu"))
    module.objective.load_state_dict(torch.load(Path(path) / "objective.pt", map_location="cpu"))


def load_trainer_state(path: Path) -> dict[str, Any]:
    _require_complete(path)
    return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
