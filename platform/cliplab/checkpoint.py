"""The checkpoint format, shared by training, resume, ``cliplab eval``, the pyfunc model and the
registry: how a checkpoint is written (:func:`save_checkpoint`), found (:func:`latest_in_storage`)
and read (:func:`load_module` for a model ready to embed, :func:`read_weights` for its state dicts).

Layout of one checkpoint folder:

    model.pt       open_clip state dict (loadable by ``open_clip.create_model(name, pretrained=...)``),
                   its ``logit_scale`` (and a SigLIP model's ``logit_bias``) the objective's trained ones
    objective.pt   the objective's scalars
    trainer.pt     optimizer, scheduler, step, epoch, RNG states (torch, CUDA, numpy, python),
                   the MLflow run id (a restart continues the same run), the data position
                   Every file holds only tensors and plain types (dict, list, str, numbers) and
                   is read with ``torch.load(weights_only=True)``: a pickle from the bucket never
                   runs code. (Checkpoints written before this format kept the numpy RNG state
                   as a numpy array; they are read with numpy's array constructors allowed and
                   nothing else, and the next checkpoint is written in the new format.)
    config.json    the resolved experiment config, redacted like MLflow params (a password in
                   tracking.uri reads ``***``: give it again to resume from this file)
    COMPLETE       written last, atomically: a folder without it is a torn write and is never loaded

trainer.pt also holds the fp16 gradient scaler's state (``scaler``, ``train.precision: fp16``)
and the names of the frozen parameters (``frozen``: the locked towers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cliplab.config import ExperimentConfig, from_dict, to_dict
from cliplab.errors import CliplabError
from cliplab.models import with_trained_temperature

MARKER = "COMPLETE"


class IncompleteCheckpointError(RuntimeError):
    pass


class UnsafeCheckpointError(CliplabError):
    """A checkpoint file holds pickled objects other than tensors and plain data."""


def save_checkpoint(path: Path, module, optimizer, scheduler, *, step: int, epoch: int,
                    cfg: ExperimentConfig, extra: dict[str, Any] | None = None) -> Path:
    """Write every file, then the ``COMPLETE`` marker (via rename, so it is all-or-nothing)."""
    import random

    import numpy as np

    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    torch.save(with_trained_temperature(module.model.state_dict(), module.objective.state_dict()), path / "model.pt")
    torch.save(module.objective.state_dict(), path / "objective.pt")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    # plain types and tensors only: trainer.pt must load with torch.load(weights_only=True)
    rng = {"torch": torch.get_rng_state(),
           "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
           "python": {"version": int(version), "state": list(words), "gauss_next": gauss_next},
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": epoch, "rng": rng, **(extra or {})}, path / "trainer.pt")
    from cliplab.redaction import Redactor

    (path / "config.json").write_text(json.dumps(Redactor().tree(to_dict(cfg)), indent=2))
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
            try:
                found.append((int(json.loads(f.read())["step"]), info.path))
            except (ValueError, KeyError, TypeError):
                continue  # a marker cut short by an older writer: not complete either
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
    state = rng["numpy"]
    if isinstance(state, dict):
        np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                             state["has_gauss"], state["cached_gaussian"]))
    else:  # a checkpoint from before the plain-types format (see the module docstring)
        np.random.set_state(state)
    state = rng["python"]
    random.setstate((state["version"], tuple(state["state"]), state["gauss_next"]) if isinstance(state, dict)
                    else state)
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_config(path: Path) -> ExperimentConfig:
    return from_dict(ExperimentConfig, json.loads((Path(path) / "config.json").read_text()))


# what a trainer.pt written before the plain-types format needs besides plain types: numpy's RNG
# state array (data-only constructors; the numpy 1.x module name as such pickles spell it too)
_LEGACY_NUMPY = frozenset({"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                           "numpy.core.multiarray._reconstruct"})


def safe_load(source, what: str, *, legacy_numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file (a path or a binary file object):
    tensors and plain types only. Anything else (a class, a function: a pickle that would run code)
    is refused with :class:`UnsafeCheckpointError`, before any of it is built."""
    import pickle

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(source))
        except Exception:  # noqa: BLE001 - not even a torch zip: say so below
            found = set()
        if legacy_numpy and found and found <= _LEGACY_NUMPY:
            import numpy as np

            if hasattr(source, "seek"):
                source.seek(0)
            with torch.serialization.safe_globals([np.ndarray, np.dtype, np.dtypes.UInt32DType,
                                                   np._core.multiarray._reconstruct]):
                return torch.load(source, map_location="cpu", weights_only=True)
        named = ", ".join(sorted(found)[:5]) if found else str(err).splitlines()[0][:200]
        raise UnsafeCheckpointError(
            f"{what} holds objects that are not tensors or plain data ({named}); refusing to unpickle it, "
            "since that could run code. Use a checkpoint written by cliplab train from storage only you can "
            "write, or start the run again") from None


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the objective's state dicts of a complete checkpoint (:func:`safe_load`)."""
    _require_complete(path)
    return (safe_load(Path(path) / "model.pt", f"{path}/model.pt"),
            safe_load(Path(path) / "objective.pt", f"{path}/objective.pt"))


def load_weights(path: Path, module) -> None:
    """The checkpoint's weights into ``module`` (a :class:`cliplab.models.DualEncoder`)."""
    model_state, objective_state = read_weights(path)
    module.model.load_state_dict(model_state)
    module.objective.load_state_dict(objective_state)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready to embed: its experiment config, the model bundle (transforms,
    tokenizer) and the :class:`cliplab.models.DualEncoder` holding the trained weights, in eval mode
    on the CPU."""

    cfg: ExperimentConfig
    bundle: Any
    module: Any


def load_module(path: str | Path) -> LoadedCheckpoint:
    """The one loader of a checkpoint as a model (``cliplab eval``, the pyfunc model): its
    ``config.json`` builds the model and the objective, then the weights load. Raises
    :class:`IncompleteCheckpointError`, :class:`UnsafeCheckpointError` or ``FileNotFoundError``."""
    from cliplab.models import DualEncoder, build_model
    from cliplab.objectives import build_objective

    path = Path(path)
    cfg = load_config(path)
    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    load_weights(path, module)
    module.eval()
    return LoadedCheckpoint(cfg, bundle, module)


def load_trainer_state(path: Path) -> dict[str, Any]:
    _require_complete(path)
    return safe_load(Path(path) / "trainer.pt", f"{path}/trainer.pt", legacy_numpy=True)


def read_trainer_state(filesystem, path: str) -> dict[str, Any]:
    """:func:`load_trainer_state` of a checkpoint on a pyarrow filesystem (local or S3), without
    copying the rest: what the driver checks before it resumes a run."""
    import io

    with filesystem.open_input_stream(f"{path}/trainer.pt") as f:
        blob = io.BytesIO(f.read())
    return safe_load(blob, f"{path}/trainer.pt", legacy_numpy=True)
