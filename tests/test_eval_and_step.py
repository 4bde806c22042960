"""Retrieval/zero-shot metrics against brute-force references, and the Ray-free training step."""

import numpy as np
import pytest
import torch

from cliplab.config import ModelConfig, ObjectiveConfig, OptimConfig
from cliplab.distributed import DistContext
from cliplab.eval import evaluate_embeddings, retrieval_metrics, zero_shot_report
from cliplab.models import DualEncoder, build_model
from cliplab.objectives import build_objective
from cliplab.train.step import build_optimizer, cosine_with_warmup, param_groups, train_step


def brute_force_recall(sim: np.ndarray, k: int) -> float:
    hits = 0
    for i, row in enumerate(sim):
        better = sum(1 for j, v in enumerate(row) if v > row[i] and j != i)
        hits += better < k
    return hits / len(sim)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_retrieval_matches_brute_force_in_any_chunking(chunk):
    rng = np.random.default_rng(1)
    a, b = torch.tensor(rng.normal(size=(17, 4))), torch.tensor(rng.normal(size=(17, 4)))
    got = retrieval_metrics(a, b, lambda q, m: q @ m.T, ks=(1, 5), chunk=chunk)
    sim = (a @ b.T).numpy()
    assert got["image_to_text_R1"] == pytest.approx(brute_force_recall(sim, 1))
    assert got["image_to_text_R5"] == pytest.approx(brute_force_recall(sim, 5))
    assert got["text_to_image_R1"] == pytest.approx(brute_force_recall(sim.T, 1))
    perfect = retrieval_metrics(a, a, lambda q, m: -torch.cdist(q, m), chunk=chunk)
    assert perfect["image_to_text_R1"] == 1.0


def test_zero_shot_accuracy_counts_and_mean_per_class():
    class_emb = torch.eye(3)
    image_emb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]])
    targets = torch.tensor([0, 1, 2, 2])  # classes a, b, c, c: the third image is wrong
    out = zero_shot_report(image_emb, targets, class_emb, lambda x, y: x @ y.T)
    assert out["top1"] == pytest.approx(3 / 4)
    assert out["mean_per_class"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_evaluate_embeddings_reports_zero_shot_only_with_labels():
    obj = build_objective(ObjectiveConfig())
    vocab = {"red": 0, "blue": 1, "an emoji of red": 0, "an emoji of blue": 1}

    def enc_text(texts):
        return torch.nn.functional.one_hot(torch.tensor([vocab[t] for t in texts]), 2).float()

    batches = [{"image": np.eye(2, dtype=np.float32), "caption": np.array(["red", "blue"], dtype=object),
                "label": np.array(["red", "blue"], dtype=object)}]
    out = evaluate_embeddings(lambda im: im, enc_text, obj, batches, ["an emoji of {}"])
    assert out["val/image_to_text_R1"] == 1.0 and out["val/zeroshot_top1"] == 1.0
    batches[0]["label"] = np.array(["", ""], dtype=object)
    assert "val/zeroshot_top1" not in evaluate_embeddings(lambda im: im, enc_text, obj, batches, ["{}"])


def test_no_weight_decay_on_gains_biases_embeddings_and_objective_scalars():
    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig()))
    decay, no_decay = param_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "objective.log_scale" in no_decay_names
    assert any("positional_embedding" in n for n in no_decay_names)
    assert any("token_embedding" in n for n in no_decay_names)
    assert all(not n.endswith(".bias") for n in decay_names)
    assert any(n.endswith("in_proj_weight") for n in decay_names)
    assert "model.logit_scale" not in decay_names | no_decay_names  # open_clip's own scale is frozen
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig()))
    opt = build_optimizer(module, OptimConfig(lr=1e-3, warmup_steps=0))
    sched = cosine_with_warmup(opt, 0, 100)
    batch = {"image": torch.randn(8, 3, 64, 64), "text": bundle.tokenizer([f"caption {i}" for i in range(8)])}
    first = train_step(module, batch, opt, sched, DistContext())
    for _ in range(5):
        last = train_step(module, batch, opt, sched, DistContext())
    assert last["train/loss"] < first["train/loss"]
    assert {"train/grad_norm", "train/lr", "scalars/logit_scale"} <= set(last)


def test_xclr_trains_the_image_tower_only():
    from cliplab.models import freeze_text_tower

    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    objective = build_objective(ObjectiveConfig(name="xclr"), bundle.embed_dim)
    assert not objective.needs_text and build_objective(ObjectiveConfig(name="clip")).needs_text
    assert freeze_text_tower(bundle.model) > 0
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visual.") for n in trainable)
    assert not bundle.model.token_embedding.weight.requires_grad


def test_compile_encoders_runs_compiled_code_with_the_same_features_and_keys():
    """`train.compile` must compile what the step calls (encode_image/encode_text via forward)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    module = DualEncoder(bundle.model, build_objective(ObjectiveConfig(name="clip"), bundle.embed_dim)).eval()
    images = torch.randn(4, 3, 64, 64)
    texts = torch.randint(0, 49408, (4, bundle.context_length))
    keys = list(module.state_dict())
    with torch.no_grad():
        eager = module(images, texts)
    torch._dynamo.reset()
    counters.clear()
    module.compile_encoders(backend="eager")  # dynamo's capture without inductor's codegen: seconds on CPU
    with torch.no_grad():
        compiled = module(images, texts)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured and compiled the encoders
    assert list(module.state_dict()) == keys
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, bias", [((64, 64), False), ((70, 67), True)])
def test_the_gemm_patch_embedding_equals_the_strided_convolution_in_float64(size, bias):
    from cliplab.models import PatchEmbedding, use_gemm_patch_embedding

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16, bias=bias).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    grads = torch.autograd.grad((expected * torch.ones_like(expected).cumsum(1)).sum(), (x, conv.weight))
    assert use_gemm_patch_embedding(conv) == 1 and isinstance(conv, PatchEmbedding)
    got = conv(x)
    assert got.shape == expected.shape  # the remainder rows and columns are dropped, as by the conv
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad((got * torch.ones_like(got).cumsum(1)).sum(), (x, conv.weight)),
                    strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert not PatchEmbedding.applies_to(torch.nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1))
    conv.eval()  # evaluation runs the convolution itself: bit for bit what open_clip computes
    assert torch.equal(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=16))


def test_built_vits_use_the_gemm_patch_embedding_with_open_clips_state_dict_keys():
    import open_clip

    from cliplab.models import PatchEmbedding

    bundle = build_model(ModelConfig(name="cliplab-tiny"))
    assert isinstance(bundle.model.visual.conv1, PatchEmbedding)
    plain = open_clip.create_model("cliplab-tiny")
    assert list(bundle.model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(bundle.model.state_dict())
    plain.eval()
    bundle.model.eval()
    image = torch.randn(2, 3, 64, 64)
    assert torch.equal(bundle.model.encode_image(image), plain.encode_image(image))  # eval mode: exact
    bundle.model.train()
    plain.train()
    torch.testing.assert_close(bundle.model.encode_image(image), plain.encode_image(image), rtol=1e-5, atol=1e-5)
