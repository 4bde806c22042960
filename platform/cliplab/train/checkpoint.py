"""Checkpoint directory layout, shared by training, resume and the model registry.

    model.pt       open_clip state dict (loadable by ``open_clip.create_model(name, pretrained=...)``)
    objective.pt   the objective's scalars
    trainer.pt     optimizer, scheduler, step, epoch, torch RNG
    config.json    the resolved experiment config
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cliplab.config import ExperimentConfig, from_dict, to_dict


def save_checkpoint(path: Path, module, optimizer, scheduler, *, step: int, epoch: int,
                    cfg: ExperimentConfig) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(module.model.state_dict(), path / "model.pt")
    torch.save(module.objective.state_dict(), path / "objective.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": epoch, "rng": torch.get_rng_state()}, path / "trainer.pt")
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return path


def load_config(path: Path) -> ExperimentConfig:
    return from_dict(ExperimentConfig, json.loads((Path(path) / "config.json").read_text()))


def load_weights(path: Path, module) -> None:
    module.model.load_state_dict(torch.load(Path(path) / "model.pt", map_location="cpu"))
    module.objective.load_state_dict(torch.load(Path(path) / "objective.pt", map_location="cpu"))


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=False)
