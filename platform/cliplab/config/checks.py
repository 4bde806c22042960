"""Value checks that types alone cannot express (:func:`validate`), run before any Ray work."""

from __future__ import annotations

from cliplab.config.schema import ExperimentConfig, ModelConfig, ObjectiveConfig
from cliplab.errors import ConfigError


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
               "model.lock_image_unlocked_groups and model.lock_text_unlocked_layers must be >= 0"),
              (m.cache_locked_text >= 0, "model.cache_locked_text must be >= 0 (captions to keep; 0: off)")]
    if m.lock_text and not m.lock_text_freeze_layer_norm:
        checks.append((_hf_text_tower(m.name),
                       f"model.lock_text_freeze_layer_norm=false needs a Hugging Face text tower; {m.name}'s own "
                       "text transformer locks its LayerNorms with the other weights (leave it true)"))
    if m.cache_locked_text > 0:
        checks.append((m.lock_text and m.lock_text_unlocked_layers == 0 and m.lock_text_freeze_layer_norm,
                       "model.cache_locked_text needs the whole text trunk locked: set model.lock_text=true, "
                       "model.lock_text_unlocked_layers=0 and model.lock_text_freeze_layer_norm=true, "
                       "or model.cache_locked_text=0"))
        checks.append((_hf_text_tower(m.name),
                       f"model.cache_locked_text needs a Hugging Face text tower (e.g. cliplab-tiny-minilm); {m.name}'s "
                       "is open_clip's own: set model.cache_locked_text=0"))
    return checks


def _hf_text_tower(name: str) -> bool:
    import open_clip

    from cliplab.models import _register_bundled_configs

    _register_bundled_configs()
    return bool((open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_model_name"))


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
        (0 < cfg.data.train_fraction <= 1, "data.train_fraction must be in (0, 1] (1 keeps every sample)"),
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
