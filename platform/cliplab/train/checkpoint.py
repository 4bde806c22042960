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
    """The complete checkpoint with the highest step under a run folder (``checkpoint_*``)."""
    found = []
    for d in Path(run_dir).glob("checkpoint_*"):
        if d.is_dir() and is_complete(d):
            found.append((json.loads((d / MARKER).read_text())["step"], d.stat().st_mtime, d))
    return max(found)[2] if found else None


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
