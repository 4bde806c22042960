"""Parity with open_clip_train (issue 20): the temperature in and out of open_clip checkpoints,
the three lr schedules and a resume that changes the budget, locked towers, fp16 with a gradient
scaler, and tab-separated CSV import. Ray-free: the trainer's own module, optimizer, scheduler and
step, on the CPU."""

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

from cliplab import checkpoint as ckpt
from cliplab.config import ExperimentConfig, ModelConfig, ObjectiveConfig, OptimConfig, validate, with_overrides
from cliplab.distributed import DistContext
from cliplab.errors import ConfigError
from cliplab.models import _register_bundled_configs, build_dual_encoder
from cliplab.train.schedule import build_scheduler, restore_scheduler
from cliplab.train.step import (
    NonFiniteGuard,
    build_optimizer,
    cosine_with_warmup,
    grad_scaler,
    resolve_precision,
    train_step,
)

N = 8


def _cfg(objective="clip", **model) -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(name="cliplab-tiny", **model), objective=ObjectiveConfig(name=objective),
                            optim=OptimConfig(lr=2e-2, warmup_steps=0, weight_decay=0.0))


def _batch(tokenizer, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(N, 3, 64, 64, generator=g), "text": tokenizer([f"caption number {i}" for i in range(N)])}


def _train(cfg, steps=3, precision="fp32", scaler=None):
    torch.manual_seed(0)
    bundle, module = build_dual_encoder(cfg)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 100)
    batch = _batch(bundle.tokenizer)
    history = [train_step(module, batch, optimizer, scheduler, DistContext(), precision=precision, scaler=scaler)
               for _ in range(steps)]
    return bundle, module, optimizer, scheduler, batch, history


# ------------------------------------------------------------------------------ temperature


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_the_open_clip_export_gives_the_trained_objectives_logits(objective, tmp_path):
    """Train, checkpoint, export; plain open_clip's logits are cliplab's similarity × s (+ b), in float64."""
    from cliplab.tracking.registry import write_open_clip_export

    cfg = with_overrides(_cfg(objective), {"objective.lr_scale": 1.0})  # SigLIP's preset 0.1 would barely move s
    bundle, module, optimizer, scheduler, batch, _ = _train(cfg)
    s = module.objective.log_scale.exp().item()
    assert abs(math.log(s) - math.log(10 if objective == "siglip" else 1 / 0.07)) > 0.01  # the scale has moved
    ckpt.save_checkpoint(tmp_path / "ckpt", module, optimizer, scheduler, step=3, epoch=0, cfg=cfg)
    export = write_open_clip_export(tmp_path / "ckpt", tmp_path / "export")

    model_cfg = json.loads((export / "cliplab-tiny.json").read_text())
    if objective == "clip":  # the architecture's own config: open_clip's factory by name
        assert "init_logit_bias" not in model_cfg
        plain = open_clip.create_model("cliplab-tiny", pretrained=str(export / "model.pt"))
    else:  # the export's config adds SigLIP's bias to the architecture: the model config + the state dict
        plain = open_clip.CLIP(**model_cfg)
        open_clip.load_checkpoint(plain, str(export / "model.pt"))
    plain = plain.double().eval()
    module = module.double().eval()
    images, texts = batch["image"].double(), batch["text"]
    with torch.no_grad():
        logits, _ = plain.get_logits(images, texts)
        obj = module.objective
        x = obj.embed(module.model.encode_image(images), "image")
        y = obj.embed(module.model.encode_text(texts), "text")
        expected = obj.similarity(x, y) * obj.log_scale.exp() + (obj.bias if objective == "siglip" else 0.0)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def _open_clip_checkpoint(path, log_scale: float, bias: float | None = None):
    _register_bundled_configs()
    model = open_clip.create_model("cliplab-tiny", **({"init_logit_bias": bias} if bias is not None else {}))
    with torch.no_grad():
        model.logit_scale.fill_(log_scale)
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_pretrained_checkpoint_keeps_its_temperature_unless_the_config_sets_one(tmp_path):
    path = _open_clip_checkpoint(tmp_path / "clip.pt", math.log(42.0))
    cfg = with_overrides(_cfg("clip"), {"model.pretrained": path})
    assert build_dual_encoder(cfg)[1].objective.log_scale.exp().item() == pytest.approx(42.0, rel=1e-6)
    cfg = with_overrides(cfg, {"objective.temperature": 0.05})  # the config overrides it
    assert build_dual_encoder(cfg)[1].objective.log_scale.exp().item() == pytest.approx(20.0, rel=1e-6)
    cloob = with_overrides(cfg, {"objective.name": "cloob", "objective.temperature": None})
    assert build_dual_encoder(cloob)[1].objective.log_scale.exp().item() == pytest.approx(30.0, rel=1e-6)  # fixed τ


def test_a_siglip_checkpoint_of_a_clip_architecture_brings_its_bias(tmp_path):
    path = _open_clip_checkpoint(tmp_path / "siglip.pt", math.log(11.0), bias=-6.5)
    cfg = with_overrides(_cfg("siglip"), {"model.pretrained": path})
    objective = build_dual_encoder(cfg)[1].objective
    assert objective.log_scale.exp().item() == pytest.approx(11.0, rel=1e-6)
    assert objective.bias.item() == pytest.approx(-6.5)
    cfg = with_overrides(cfg, {"objective.sigmoid_bias_init": -3.0})
    assert build_dual_encoder(cfg)[1].objective.bias.item() == pytest.approx(-3.0)


# ------------------------------------------------------------------------------ schedules


def _reference(kind, step, *, lr, warmup, total, cooldown=0, power=1.0, end=0.0) -> float:
    """The schedules in float64, written out from open_clip_train's definitions."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))) * lr
    if kind == "const" or step < total - cooldown:
        return lr
    return (1 - (step - (total - cooldown)) / cooldown) ** power * (lr - end) + end


def _lrs(scheduler, steps) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optim(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": 1e-3, "warmup_steps": 5, **kw})


def _optimizer(lr: float) -> torch.optim.Optimizer:  # two groups, as the trainer's (decay, no decay)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(()))]
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=lr)


def _fresh(optim: OptimConfig, total: int):
    return build_scheduler(_optimizer(optim.lr), optim, total)


@pytest.mark.parametrize("kind,extra", [("cosine", {}), ("const", {}),
                                        ("const-cooldown", {"cooldown_steps": 12, "cooldown_power": 2.0,
                                                            "cooldown_end_lr": 1e-4})])
def test_each_schedule_follows_open_clip_train_and_a_float64_reference(kind, extra):
    optim, total = _optim(schedule=kind, **extra), 40
    got = _lrs(_fresh(optim, total), total)
    ref = [_reference(kind, t, lr=1e-3, warmup=5, total=total, cooldown=extra.get("cooldown_steps", 0),
                      power=extra.get("cooldown_power", 1.0), end=extra.get("cooldown_end_lr", 0.0))
           for t in range(total)]
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = {"cosine": lambda: cosine_lr(dummy, 1e-3, 5, total), "const": lambda: const_lr(dummy, 1e-3, 5, total),
              "const-cooldown": lambda: const_lr_cooldown(dummy, 1e-3, 5, total, 12, 2.0, 1e-4)}[kind]()
    for t in range(total):
        assert got[t] == pytest.approx(ref[t], rel=1e-12, abs=1e-15), t
        assert got[t] == pytest.approx(theirs(t), rel=1e-12, abs=1e-15), t


def _resumed(optim_before, total_before, stop, optim_after, total_after):
    """Run to ``stop``, save the scheduler state (through torch.save, weights_only), resume with new settings."""
    import io

    before = _fresh(optim_before, total_before)
    history = _lrs(before, stop)
    buf = io.BytesIO()
    torch.save({"scheduler": before.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["scheduler"]
    after = _fresh(optim_after, total_after)
    restore_scheduler(after, saved, stop)
    return history, before, _lrs(after, total_after - stop)


def test_a_plain_restart_continues_the_same_schedule():
    optim = _optim(schedule="cosine")
    history, _, rest = _resumed(optim, 40, 17, optim, 40)
    assert history + rest == pytest.approx(_lrs(_fresh(optim, 40), 40), rel=1e-12)


@pytest.mark.parametrize("stop", [20, 40])
def test_a_longer_cosine_budget_cools_down_from_where_the_run_stands(stop):
    """At the end of a run (stop 40 of 40) the lr was ~0 and stays there; mid-run it decays from
    its current value to 0 at the new end along a half cosine, never above where it stood."""
    optim = _optim(schedule="cosine")
    history, before, rest = _resumed(optim, 40, stop, optim, 80)
    current = _reference("cosine", stop, lr=1e-3, warmup=5, total=40)
    assert before.optimizer.param_groups[0]["lr"] == pytest.approx(current, rel=1e-12)
    for i, lr in enumerate(rest):
        expected = current * 0.5 * (1 + math.cos(math.pi * i / (80 - stop)))
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-18), i
    assert max(rest) <= current * (1 + 1e-12)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(rest, rest[1:], strict=False))


def test_const_cooldown_moves_its_cooldown_to_the_new_end_or_continues_it():
    optim = _optim(schedule="const-cooldown", cooldown_steps=10, cooldown_end_lr=1e-4)
    _, _, rest = _resumed(optim, 40, 20, optim, 60)  # before the cooldown: it moves to steps 50..59
    assert rest == pytest.approx([_reference("const-cooldown", t, lr=1e-3, warmup=5, total=60, cooldown=10, end=1e-4)
                                  for t in range(20, 60)], rel=1e-12)
    _, _, rest = _resumed(optim, 40, 35, optim, 60)  # mid-cooldown: from where it stands to the end lr at 60
    current = _reference("const-cooldown", 35, lr=1e-3, warmup=5, total=40, cooldown=10, end=1e-4)
    assert rest == pytest.approx([1e-4 + (current - 1e-4) * (1 - i / 25) for i in range(25)], rel=1e-9)


def test_a_const_run_can_be_resumed_into_a_cooldown():
    """open_clip's PR #356 workflow: train at a constant lr, then cool down from a checkpoint."""
    after = _optim(schedule="const-cooldown", cooldown_steps=10)
    _, _, rest = _resumed(_optim(schedule="const"), 1000, 30, after, 50)
    assert rest == pytest.approx([_reference("const-cooldown", t, lr=1e-3, warmup=5, total=50, cooldown=10)
                                  for t in range(30, 50)], rel=1e-12)


def test_a_checkpoint_from_before_saved_schedules_also_never_raises_the_lr():
    old = cosine_with_warmup(_optimizer(1e-3), 5, 40)
    _lrs(old, 40)  # finished: its lr is ~0
    saved = old.state_dict()
    assert saved["lr_lambdas"] == [None, None]  # a plain function: LambdaLR saved nothing of it
    after = _fresh(_optim(schedule="cosine"), 80)
    restore_scheduler(after, saved, 40)
    assert max(_lrs(after, 40)) <= 1e-3 * 1e-12  # the old code jumped back to half the peak


# ------------------------------------------------------------------------------ locked towers


def test_locked_towers_do_not_move_while_the_run_learns(tmp_path):
    cfg = with_overrides(_cfg("clip", lock_image=True, lock_image_unlocked_groups=1), {"optim.lr": 2e-3})
    bundle, module, optimizer, scheduler, _, history = _train(cfg, steps=0)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("visual.")} == {"visual.proj"}  # the last group is unlocked
    assert any(n.startswith("transformer.") for n in trainable)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and not any(id(p) in in_optimizer for p in frozen.values())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = _batch(bundle.tokenizer)
    losses = [train_step(module, batch, optimizer, scheduler, DistContext())["train/loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05  # it learns
    for name, p in module.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in {f"model.{n}" for n in trainable} | {"objective.log_scale"}), name
    ckpt.save_checkpoint(tmp_path / "c", module, optimizer, scheduler, step=8, epoch=0, cfg=cfg)
    assert ckpt.load_config(tmp_path / "c").model.lock_image_unlocked_groups == 1  # the choice is recorded


def test_a_locked_text_tower_with_unlocked_layers_and_the_xclr_freeze_are_one_code_path():
    _, module = build_dual_encoder(_cfg("clip", lock_text=True, lock_text_unlocked_layers=1))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad and not n.startswith("visual.")}
    assert trainable == {"text_projection"}  # open_clip's last text group is the projection
    _, xclr = build_dual_encoder(_cfg("xclr", lock_text=True, lock_text_unlocked_layers=1))
    assert not any(p.requires_grad for n, p in xclr.model.named_parameters() if not n.startswith("visual."))


# ------------------------------------------------------------------------------ fp16


def test_precision_auto_is_fp32_on_the_cpu_and_explicit_choices_stand():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("auto", "bf16", "fp16", "fp32")] == ["fp32", "bf16", "fp16", "fp32"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_auto_on_a_gpu_is_bf16_where_it_has_it_else_fp16_with_a_scaler():
    cuda = torch.device("cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", cuda) == expected
    assert (grad_scaler(resolve_precision("auto", cuda), cuda) is None) == (expected == "bf16")


def test_fp16_with_a_gradient_scaler_trains_on_the_cpu_and_reports_true_gradients():
    scaler = grad_scaler("fp16", torch.device("cpu"))
    assert grad_scaler("bf16", torch.device("cpu")) is None
    cfg = _cfg("clip")
    _, module, optimizer, scheduler, batch, history = _train(cfg, steps=1, precision="fp16", scaler=scaler)
    assert history[0]["train/nonfinite"] == 0.0
    # the same first step in fp32 from the same init: the norm is unscaled (not × 65536), up to fp16 rounding
    _, _, _, _, _, ref = _train(cfg, steps=1)
    assert history[0]["train/grad_norm"] == pytest.approx(ref[0]["train/grad_norm"], rel=0.05)
    assert history[0]["train/loss"] == pytest.approx(ref[0]["train/loss"], rel=0.01)


def test_an_fp16_overflow_lowers_the_scale_and_does_not_count_as_a_non_finite_streak(tmp_path):
    scaler = grad_scaler("fp16", torch.device("cpu"))
    cfg = _cfg("clip")
    bundle, module, optimizer, scheduler, batch, _ = _train(cfg, steps=0)
    weight = module.model.text_projection
    hook = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    guard = NonFiniteGuard(limit=2)
    for _ in range(3):  # more than the limit: overflows are the scaler's business
        metrics = train_step(module, batch, optimizer, scheduler, DistContext(), precision="fp16", scaler=scaler)
        assert metrics["train/fp16_overflow"] == 1.0 and guard.update(metrics, 0)
    hook.remove()
    assert scaler.get_scale() == 2.0 ** 13  # halved three times
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
    metrics = train_step(module, batch, optimizer, scheduler, DistContext(), precision="fp16", scaler=scaler)
    assert metrics["train/nonfinite"] == 0.0 and not guard.update(metrics, 1)
    # the scaler's state goes through a checkpoint and back
    ckpt.save_checkpoint(tmp_path / "c", module, optimizer, scheduler, step=1, epoch=0, cfg=cfg,
                         extra={"scaler": scaler.state_dict()})
    restored = grad_scaler("fp16", torch.device("cpu"))
    restored.load_state_dict(ckpt.load_trainer_state(tmp_path / "c")["scaler"])
    assert restored.get_scale() == 2.0 ** 13 and restored.state_dict() == scaler.state_dict()


def test_a_non_finite_loss_under_fp16_still_counts_towards_the_limit():
    scaler = grad_scaler("fp16", torch.device("cpu"))
    _, module, optimizer, scheduler, batch, _ = _train(_cfg("clip"), steps=0)
    batch["image"][0, 0, 0, 0] = float("nan")
    metrics = train_step(module, batch, optimizer, scheduler, DistContext(), precision="fp16", scaler=scaler)
    assert metrics["train/nonfinite"] == 1.0 and metrics["train/fp16_overflow"] == 0.0


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides,message", [
    ({"optim.schedule": "linear"}, "optim.schedule must be cosine, const or const-cooldown"),
    ({"optim.schedule": "const-cooldown"}, "needs optim.cooldown_steps >= 1"),
    ({"optim.schedule": "const-cooldown", "optim.cooldown_steps": 95, "train.max_steps": 100},
     "exceed train.max_steps"),
    ({"train.precision": "fp8"}, "train.precision must be auto, bf16, fp16 or fp32"),
    ({"model.lock_text": True, "model.lock_text_freeze_layer_norm": False}, "needs a Hugging Face text tower"),
    ({"model.lock_image_unlocked_groups": -1}, "must be >= 0"),
])
def test_bad_parity_settings_are_one_line_config_errors(overrides, message):
    cfg = with_overrides(ExperimentConfig(), {"data.train": "x", **overrides})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


# ------------------------------------------------------------------------------ CSV import


def test_a_tab_separated_table_is_sniffed_and_builds_shards(tmp_path):
    from PIL import Image

    from cliplab.data.shards import build_from_table, sniff_separator

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"im{i}.png")
    rows = "".join(f"im{i}.png\ta red square, number {i}\n" for i in range(4))  # commas inside the captions
    (tmp_path / "train.csv").write_text("filepath\ttitle\n" + rows)  # open_clip_train's default CSV
    assert sniff_separator(tmp_path / "train.csv") == "\t"
    stats = build_from_table(tmp_path / "train.csv", tmp_path / "out", image_col="filepath", caption_col="title",
                             val_fraction=0.0, workers=1, progress=False)
    assert stats["samples"] == 4 and not stats["skipped"]
    (tmp_path / "comma.csv").write_text("image,caption\n" + "".join(f"im{i}.png,square {i}\n" for i in range(4)))
    assert sniff_separator(tmp_path / "comma.csv") == ","


def test_a_locked_hugging_face_text_tower_exports_and_reloads_in_plain_open_clip(tmp_path):
    """The LiT recipe's model (cliplab-tiny-minilm, its text tower all-MiniLM-L6-v2 resolved to
    the offline package): the export's config is JSON (the registry writes it; a Path in it
    crashed the demo's registration) and plain open_clip reproduces the trained logits."""
    from cliplab.tracking.registry import write_open_clip_export

    cfg = with_overrides(_cfg("clip"), {"model.name": "cliplab-tiny-minilm", "model.lock_text": True})
    bundle, module, optimizer, scheduler, batch, _ = _train(cfg, steps=2)
    ckpt.save_checkpoint(tmp_path / "ckpt", module, optimizer, scheduler, step=2, epoch=0, cfg=cfg)
    export = write_open_clip_export(tmp_path / "ckpt", tmp_path / "export")
    text_cfg = json.loads((export / "cliplab-tiny-minilm.json").read_text())["text_cfg"]
    assert Path(text_cfg["hf_model_name"], "config.json").is_file()  # the offline copy, as a plain string
    open_clip.add_model_config(export / "cliplab-tiny-minilm.json")  # as the export's README says
    plain = open_clip.create_model("cliplab-tiny-minilm", pretrained=str(export / "model.pt")).eval()
    module = module.eval()
    with torch.no_grad():
        logits, _ = plain.get_logits(batch["image"], batch["text"])
        obj = module.objective
        x = obj.embed(module.model.encode_image(batch["image"]), "image")
        y = obj.embed(module.model.encode_text(batch["text"]), "text")
        expected = obj.similarity(x, y) * obj.log_scale.exp()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
