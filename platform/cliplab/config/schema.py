"""The config tree's frozen dataclasses, one per component, under :class:`ExperimentConfig`.

Credentials never live here: S3 keys come from the standard AWS environment/profile chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # keep this fraction of the training samples (data-scarcity studies): each sample is kept by a hash of
    # its shard's name, its position and train_fraction_seed, so every rank and run sees the same subset
    # and a smaller fraction's subset lies inside a larger one's
    train_fraction: float = 1.0
    train_fraction_seed: int = 0
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
    # > 0: keep a locked HF text trunk's pooled output for up to this many captions per worker (LRU),
    # so later epochs skip the trunk (run in eval mode: no dropout); 0: off (models.LockedTextCache)
    cache_locked_text: int = 0


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
    # multiplies optim.lr (encoders and scalars alike); None = the preset's: 0.1 for siglip and cloob,
    # whose losses collapse at InfoNCE's step sizes (ContrastiveObjective.lr_scale), else 1
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
