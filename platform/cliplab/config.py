"""One frozen, typed config tree for an experiment.

Every component owns a small frozen dataclass; the CLI (``--set a.b=v``), experiment files and
Tune search spaces all address it by dotted keys. :func:`validate` runs before any Ray work, so
an unknown key, a wrong type or an out-of-range value fails in the driver with one line.

Credentials never live here: S3 keys come from the standard AWS environment/profile chain.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cliplab.errors import ConfigError


@dataclass(frozen=True)
class S3Config:
    """Where ``s3://`` URLs live. Keys come from AWS_* env vars or ``profile``, never from here."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL, then AWS itself
    region: str = "us-east-1"
    profile: str | None = None
    connect_timeout_s: float = 3.0
    # a request that receives nothing for this long fails (curl's low-speed limit: an idle timeout,
    # not a cap on a long transfer); with max_attempts, a stalled endpoint is reported within
    # max_attempts × request_timeout_s (+ about 1 s), 7 s by default
    request_timeout_s: float = 3.0
    max_attempts: int = 2


@dataclass(frozen=True)
class SourceConfig:
    """One training source: a shard URL list and its mixing weight.

    ``url`` is anything ``data.train`` accepts (brace-expanded ``s3://`` or local shards, a
    directory/prefix of ``*.tar``, ``::``-joined lists). Each epoch draws ``weight / Σ weights``
    of its samples from this source (with repeats when a small source is up-weighted).
    """

    url: str = ""
    weight: float = 1.0
    name: str | None = None  # shown in logs and metrics; default: source0, source1, ...


@dataclass(frozen=True)
class DataConfig:
    """Shards in img2dataset layout: ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``.

    ``train``/``val`` are a brace-expanded shard list (``s3://b/p/train-{000000..000009}.tar``),
    a directory or prefix holding ``*.tar`` files, or a single tar. For several weighted training
    sources, leave ``train`` empty and list ``sources`` (``[{url: ..., weight: 0.7}, ...]``).
    """

    train: str = ""
    val: str | None = None
    sources: tuple[SourceConfig, ...] = ()  # weighted mixture; exclusive with `train`
    s3: S3Config = field(default_factory=S3Config)
    batch_size: int = 64  # per worker
    seed: int = 0  # shard/sample order: the same seed gives the same order, epoch by epoch
    shuffle_files: bool = True  # shuffle shard order each epoch (false: shards in listed order)
    shuffle_window: int = 1000  # samples shuffled together within a rank's stream (one read task each)
    prefetch_batches: int = 2  # decoded blocks buffered ahead of the training step
    label_key: str | None = "group"  # json field used as the zero-shot class, if present
    cpus_per_task: float = 0.5  # Ray Data read/decode tasks; fractional so they fit beside workers
    # where training samples are decoded: "tasks" (Ray Data tasks, per rank and epoch: cores beside a GPU
    # worker), "worker" (a thread of the Train worker: no per-epoch start-up), "auto" (tasks on a GPU, else worker)
    decode_on: str = "auto"
    caption_embeddings: str | None = None  # X-CLR: folder written by `cliplab data embed-captions`
    record_keys: str | None = None  # audit: each rank appends "epoch<TAB>batch<TAB>key" per trained sample
    # per-member caps, by declared size (a bigger member is never read: its sample is skipped as
    # oversized_member): image members, and every other member (txt, json, cls)
    max_image_bytes: int = 64 << 20
    max_text_bytes: int = 1 << 20

    def train_sources(self) -> tuple[SourceConfig, ...]:
        """The training sources: ``sources``, or ``train`` as one source of weight 1."""
        if self.sources:
            return tuple(SourceConfig(s.url, s.weight, s.name or f"source{i}") for i, s in enumerate(self.sources))
        return (SourceConfig(self.train, 1.0, "train"),) if self.train else ()

    def describe_train(self) -> str:
        """``train``, or the sources as ``url@weight`` joined by `` + `` (for logs and tags)."""
        return self.train or " + ".join(f"{s.url}@{s.weight:g}" for s in self.sources)


@dataclass(frozen=True)
class ModelConfig:
    """An open_clip architecture by name, or one of cliplab's bundled JSON configs."""

    name: str = "cliplab-tiny"
    pretrained: str | None = None  # a local open_clip checkpoint file; never a hub download
    # LiT-style locked towers, with open_clip's lock functions (open_clip_train's --lock-* flags)
    lock_image: bool = False  # freeze the image tower
    lock_image_unlocked_groups: int = 0  # leave the last n layer groups of a locked image tower trainable
    lock_image_freeze_bn_stats: bool = False  # also freeze BatchNorm running stats of locked layers (ResNets)
    lock_text: bool = False  # freeze the text tower
    lock_text_unlocked_layers: int = 0  # leave the last n layer groups of a locked text tower trainable
    lock_text_freeze_layer_norm: bool = True  # false: LayerNorms of a locked HF text tower stay trainable


@dataclass(frozen=True)
class ObjectiveConfig:
    """A point of the contrastive family (see ``shared/objectives.md``).

    ``name`` picks a preset (clip, siglip, cloob, meru, xclr); the axis fields left at None take
    the preset's value, so ``name: cloob`` + ``geometry: lorentz`` is Hopfield retrieval in
    hyperbolic space. Every field is a dotted key that Tune can sweep.
    """

    name: str = "clip"
    geometry: str | None = None  # euclidean | lorentz
    targets: str | None = None  # hard | soft (X-CLR caption-similarity targets)
    denominator: str | None = None  # infonce | infoloob | sigmoid
    retrieval: str | None = None  # none | hopfield
    entailment_weight: float | None = None  # λ of MERU's entailment-cone loss (lorentz only)
    temperature: float | None = None  # τ at init (s = 1/τ, stored as log s); None: the preset's, or model.pretrained's
    learn_temperature: bool | None = None
    max_logit_scale: float = 100.0  # clamp s to [1, max_logit_scale]
    hopfield_beta: float = 8.0  # β, stored as log β
    learn_beta: bool = False
    hopfield_chunk: int | None = 4096  # queries per recomputed retrieval chunk; None keeps B × N weights
    aperture_k: float = 0.1  # K of the entailment cone's half-aperture
    curvature_init: float = 1.0  # c, stored as log c, clamped to [curvature_min, curvature_max]
    curvature_min: float = 0.1
    curvature_max: float = 10.0
    learn_curvature: bool = True
    alpha_init: float | None = None  # MERU's feature scale α; None = embed_dim ** -0.5; clamped ≤ 1
    sigmoid_bias_init: float | None = None  # SigLIP's b at init; None: -10, or model.pretrained's logit_bias
    soft_target_temperature: float = 0.1  # X-CLR's τ_s
    soft_target_views: str = "image_image"  # X-CLR: two image views (the seed) or image_text
    loob_scale_by_tau: bool = False  # the CLOOB reference multiplies its loss by τ
    # multiplies optim.lr (encoders and scalars alike); None = the preset's: 0.1 for cloob, whose loss
    # through Hopfield retrieval collapses at InfoNCE's step sizes (ContrastiveObjective.lr_scale), else 1
    lr_scale: float | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warmup, then a cosine, constant or constant-then-cooldown schedule, in steps."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine (to 0 at the last step) | const | const-cooldown (open_clip_train's)
    cooldown_steps: int = 0  # const-cooldown: the last n steps decay to cooldown_end_lr
    cooldown_power: float = 1.0  # const-cooldown: 1 is a linear decay, else polynomial (open_clip's lr_cooldown_power)
    cooldown_end_lr: float = 0.0  # const-cooldown: the lr at the last step
    grad_clip_norm: float | None = None  # clip the global gradient norm (None: measure it, no clipping)
    fused: bool | None = None  # fused AdamW kernel (None: on CUDA, where it exists)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop and its Ray Train resources."""

    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional, so Ray Data's read tasks are not starved
    gpus_per_worker: float = 1.0
    checkpoint_every: int = 50  # steps; a final checkpoint is always written
    checkpoint_every_minutes: float | None = None  # also checkpoint when this much time has passed
    keep_checkpoints: int = 2  # top-k by recency; older ones are deleted
    log_every: int = 10
    eval_every_epoch: bool = True
    eval_every_steps: int | None = None  # in-training eval (retrieval + zero-shot on data.val)
    seed: int = 0
    torch_threads: int = 1
    accum_steps: int = 1  # gradient accumulation with cached features: global negatives are kept
    precision: str = "auto"  # auto (bf16 on GPU, fp16 on GPUs without bf16, fp32 on CPU) | bf16 | fp16 | fp32
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the encoders
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions on CUDA (open_clip_train's default too)
    max_failures: int = 2  # Ray Train restarts from the latest checkpoint after a worker dies
    max_nonfinite_steps: int = 5  # non-finite losses in a row that stop the run (each is skipped)
    peak_tflops: float | None = None  # per-GPU peak for MFU (default: known GPUs' bf16 dense peak)


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval on the val split, and zero-shot over the ``data.label_key`` classes."""

    templates: tuple[str, ...] = ("a photo of {}.",)
    batch_size: int = 128


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. ``uri`` None means MLFLOW_TRACKING_URI, else tracking is off (no-op tracker)."""

    uri: str | None = None
    experiment: str = "cliplab"
    run_name: str | None = None
    spool_dir: str | None = None  # records wait here while MLflow is down (default: $TMPDIR/cliplab-mlflow-spool)
    flush_timeout_s: float = 120.0  # at the end of a run, how long to wait for a down server
    system_metrics: bool = True  # MLflow's CPU/memory/GPU sampling under system/


@dataclass(frozen=True)
class ExperimentConfig:
    """The root of the tree."""

    name: str = "cliplab"
    storage_path: str = ".cliplab/runs"  # local dir or s3:// for checkpoints and Ray results
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, with type checks


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and coerce where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{name}'{hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in known:
            raise _unknown_key(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested plain-dict form (tuples become lists), as written to YAML/JSON and MLflow."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3" -> ("train.lr", 0.001)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with dotted-key overrides applied and type-checked."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        cls = type(cfg)
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i]) + ("." if i else "")
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown_key(cls, part, prefix)
            if i == len(parts) - 1:
                node[part] = value
            else:
                sub = typing.get_type_hints(cls)[part]
                if not _is_dataclass_type(sub):
                    raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
                node, cls = node[part], sub
    return from_dict(type(cfg), data)


# --------------------------------------------------------------------------------------------
# loading and validation


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from YAML (the tree as a mapping) or Python (a module-level ``CONFIG``),
    apply ``--set`` overrides and validate. Raises :class:`ConfigError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        cfg = from_dict(ExperimentConfig, data)
    elif path.suffix == ".py":
        cfg = getattr(load_python_file(path), "CONFIG", None)
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(f"{path}: must define CONFIG = ExperimentConfig(...)")
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml or .py")
    cfg = with_overrides(cfg, dict(parse_override(o) for o in overrides or []))
    validate(cfg)
    return cfg


def load_python_file(path: Path) -> types.ModuleType:
    """Import a Python file (an experiment or sweep) as a module."""
    spec = importlib.util.spec_from_file_location(f"cliplab_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as err:  # user code: report where it broke, in one line
        raise ConfigError(f"{path}: failed to import: {type(err).__name__}: {err}") from None
    return module


def _objective_checks(obj: ObjectiveConfig) -> list[tuple[bool, str]]:
    from cliplab.objectives.family import CHOICES, PRESETS, resolve

    if obj.name not in PRESETS:
        return [(False, f"objective.name '{obj.name}' is not one of {sorted(PRESETS)}")]
    r = resolve(obj)
    checks = [(getattr(r, axis) in choices, f"objective.{axis} '{getattr(r, axis)}' is not one of {list(choices)}")
              for axis, choices in CHOICES.items()]
    return checks + [
        (0 < r.temperature <= 1, "objective.temperature must be in (0, 1]"),
        (obj.max_logit_scale >= 1, "objective.max_logit_scale must be >= 1"),
        (r.temperature <= 0 or 1 / r.temperature <= obj.max_logit_scale,  # (the check above reports τ <= 0)
         "objective.temperature is below 1/max_logit_scale; it would be clamped at once"),
        (r.entailment_weight >= 0, "objective.entailment_weight must be >= 0"),
        (r.entailment_weight == 0 or r.geometry == "lorentz",
         "objective.entailment_weight > 0 needs objective.geometry=lorentz (cones live in hyperbolic space)"),
        (obj.hopfield_beta > 0, "objective.hopfield_beta must be > 0"),
        (r.lr_scale > 0, "objective.lr_scale must be > 0"),
        (obj.hopfield_chunk is None or obj.hopfield_chunk >= 1,
         "objective.hopfield_chunk must be >= 1 (queries per chunk) or null (no recomputation)"),
        (0 < obj.curvature_min <= obj.curvature_init <= obj.curvature_max,
         "objective.curvature_init must lie in [curvature_min, curvature_max], all > 0"),
        (obj.alpha_init is None or 0 < obj.alpha_init <= 1, "objective.alpha_init must be in (0, 1]"),
        (0 < obj.aperture_k < 1, "objective.aperture_k must be in (0, 1)"),
        (obj.soft_target_temperature > 0, "objective.soft_target_temperature must be > 0"),
        (obj.soft_target_views in ("image_image", "image_text"),
         "objective.soft_target_views must be image_image or image_text"),
    ]


def _needs_caption_embeddings(obj: ObjectiveConfig) -> bool:
    from cliplab.objectives import data_needs

    return data_needs(obj).caption_embeddings


def _schedule_checks(cfg: ExperimentConfig) -> list[tuple[bool, str]]:
    o, max_steps = cfg.optim, cfg.train.max_steps
    return [
        (o.schedule in ("cosine", "const", "const-cooldown"), "optim.schedule must be cosine, const or const-cooldown"),
        (o.schedule != "const-cooldown" or o.cooldown_steps >= 1,
         "optim.schedule=const-cooldown needs optim.cooldown_steps >= 1 (the steps of the final decay)"),
        (o.cooldown_steps >= 0 and o.cooldown_power > 0 and 0 <= o.cooldown_end_lr <= o.lr,
         "optim.cooldown_steps must be >= 0, optim.cooldown_power > 0 and optim.cooldown_end_lr in [0, optim.lr]"),
        (o.schedule != "const-cooldown" or max_steps is None or o.warmup_steps + o.cooldown_steps <= max_steps,
         "optim.warmup_steps + optim.cooldown_steps exceed train.max_steps: shorten them or raise train.max_steps"),
    ]


def _lock_checks(m: ModelConfig) -> list[tuple[bool, str]]:
    checks = [(m.lock_image_unlocked_groups >= 0 and m.lock_text_unlocked_layers >= 0,
               "model.lock_image_unlocked_groups and model.lock_text_unlocked_layers must be >= 0")]
    if m.lock_text and not m.lock_text_freeze_layer_norm:
        import open_clip

        from cliplab.models import _register_bundled_configs

        _register_bundled_configs()
        text_cfg = (open_clip.get_model_config(m.name) or {}).get("text_cfg", {})
        checks.append((bool(text_cfg.get("hf_model_name")),
                       f"model.lock_text_freeze_layer_norm=false needs a Hugging Face text tower; {m.name}'s own "
                       "text transformer locks its LayerNorms with the other weights (leave it true)"))
    return checks


def validate(cfg: ExperimentConfig) -> None:
    """Value checks that types alone can't express. Cheap: touches no network or Ray."""
    checks = [
        (bool(cfg.data.train) or bool(cfg.data.sources),
         "data.train is empty: point it at the training shards (or list weighted data.sources)"),
        (not (cfg.data.train and cfg.data.sources),
         "set either data.train or data.sources, not both (data.train is one source of weight 1)"),
        *[(bool(s.url.strip()), f"data.sources[{i}].url is empty") for i, s in enumerate(cfg.data.sources)],
        *[(s.weight > 0, f"data.sources[{i}].weight must be > 0") for i, s in enumerate(cfg.data.sources)],
        (len({s.name for s in cfg.data.train_sources()}) == len(cfg.data.sources) or not cfg.data.sources,
         "data.sources names must be unique"),
        (cfg.data.shuffle_window >= 1, "data.shuffle_window must be >= 1"),
        (cfg.data.prefetch_batches >= 0, "data.prefetch_batches must be >= 0"),
        (cfg.data.max_image_bytes >= 1 and cfg.data.max_text_bytes >= 1,
         "data.max_image_bytes and data.max_text_bytes must be >= 1 (bytes; a larger member is skipped)"),
        (cfg.data.s3.connect_timeout_s > 0 and cfg.data.s3.request_timeout_s > 0,
         "data.s3.connect_timeout_s and data.s3.request_timeout_s must be > 0 (seconds)"),
        (cfg.data.s3.max_attempts >= 1, "data.s3.max_attempts must be >= 1"),
        (cfg.data.batch_size >= 2, "data.batch_size must be >= 2 (contrastive needs negatives)"),
        *_objective_checks(cfg.objective),
        (not _needs_caption_embeddings(cfg.objective) or bool(cfg.data.caption_embeddings),
         "soft targets (X-CLR) need data.caption_embeddings: run `cliplab data embed-captions SHARDS` first"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.data.cpus_per_task > 0, "data.cpus_per_task must be > 0"),
        (cfg.data.decode_on in ("auto", "tasks", "worker"),
         f"data.decode_on must be auto, tasks or worker, not {cfg.data.decode_on!r}"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.cpus_per_worker > 0, "train.cpus_per_worker must be > 0"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.accum_steps >= 1 and cfg.data.batch_size % cfg.train.accum_steps == 0
         and cfg.data.batch_size // cfg.train.accum_steps >= 1,
         "train.accum_steps must be >= 1 and divide data.batch_size"),
        (cfg.train.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision must be auto, bf16, fp16 or fp32"),
        *_schedule_checks(cfg),
        *_lock_checks(cfg.model),
        (cfg.optim.grad_clip_norm is None or cfg.optim.grad_clip_norm > 0, "optim.grad_clip_norm must be > 0"),
        (cfg.train.checkpoint_every_minutes is None or cfg.train.checkpoint_every_minutes > 0,
         "train.checkpoint_every_minutes must be > 0"),
        (cfg.train.eval_every_steps is None or cfg.train.eval_every_steps >= 1, "train.eval_every_steps must be >= 1"),
        (cfg.train.max_failures >= 0, "train.max_failures must be >= 0"),
        (cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1"),
        (all("{}" in t for t in cfg.eval.templates) and len(cfg.eval.templates) > 0,
         "eval.templates must be a non-empty list of strings containing '{}'"),
        (cfg.tracking.flush_timeout_s >= 0, "tracking.flush_timeout_s must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
