"""Eval metrics and paper lenses on hand-built embeddings with known answers (no Ray, no I/O)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cliplab.config import ObjectiveConfig
from cliplab.data.templates import OPENAI_IMAGENET, SIMPLE
from cliplab.eval import lenses
from cliplab.eval.metrics import retrieval_metrics, zero_shot_report
from cliplab.eval.scoring import class_embeddings, evaluate_classification, evaluate_pairs
from cliplab.objectives import build_objective
from cliplab.objectives import lorentz as L


def dot(a, b):
    return a @ b.T


# retrieval and zero-shot -----------------------------------------------------------------------
def test_perfect_retrieval_gives_recall_one_at_every_k():
    x = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    out = retrieval_metrics(x, x, dot, chunk=7)
    assert out == {f"{d}_R{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


def test_a_known_permutation_gives_known_recall():
    # one-hot embeddings; texts swapped within pairs (0,1), (2,3), (4,5): the correct text of a
    # swapped image scores 0 while exactly one other text scores 1, so its rank is 2
    n = 20
    perm = list(range(n))
    for i in (0, 2, 4):
        perm[i], perm[i + 1] = perm[i + 1], perm[i]
    images, texts = torch.eye(n), torch.eye(n)[perm]
    out = retrieval_metrics(images, texts, dot, ks=(1, 2, 5), chunk=3)
    for d in ("image_to_text", "text_to_image"):
        assert out[f"{d}_R1"] == pytest.approx(14 / 20)
        assert out[f"{d}_R2"] == out[f"{d}_R5"] == 1.0


def test_zero_shot_top_k_and_mean_per_class():
    class_emb = torch.eye(6)
    # class 0: right; class 1: second best; class 2: 6th best (all others higher)
    image_emb = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.9, 0.5, 0, 0, 0, 0], [1, 1, 0.1, 1, 1, 1], [1, 0, 0, 0, 0, 0.]])
    targets = torch.tensor([0, 1, 2, 0])
    out = zero_shot_report(image_emb, targets, class_emb, dot)
    assert out["top1"] == pytest.approx(2 / 4)
    assert out["top5"] == pytest.approx(3 / 4)
    assert out["mean_per_class"] == pytest.approx((1 + 0 + 0) / 3)


# lenses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 3, 7])
def test_effective_rank_of_a_rank_r_covariance_is_r(r):
    g = torch.Generator().manual_seed(r)
    z = torch.randn(200, r, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # centred, orthonormal columns: equal variances
    basis, _ = torch.linalg.qr(torch.randn(32, r, generator=g, dtype=torch.float64))
    x = q @ basis.T + torch.randn(32, generator=g, dtype=torch.float64)  # plus an offset
    assert lenses.effective_rank(x.float(), chunk=33) == r
    assert lenses.effective_rank(torch.ones(10, 4)) == 0


def test_alignment_and_uniformity_match_the_float64_direct_formula():
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(23, 5, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.3 * torch.randn(23, 5, generator=g, dtype=torch.float64), dim=1)
    align = sum(float(((x[i] - y[i]) ** 2).sum()) for i in range(23)) / 23
    pairs = list(itertools.combinations(range(23), 2))
    unif = math.log(sum(math.exp(-2 * float(((x[i] - x[j]) ** 2).sum())) for i, j in pairs) / len(pairs))
    assert lenses.alignment(x.float(), y.float()) == pytest.approx(align, rel=1e-5)
    assert lenses.uniformity(x, chunk=4) == pytest.approx(unif, rel=1e-10)
    assert lenses.uniformity(x[:1].repeat(5, 1)) == pytest.approx(0.0, abs=1e-12)


def test_ajne_is_low_for_uniform_points_and_high_for_clustered_ones():
    g = torch.Generator().manual_seed(4)
    n = 1000
    uniform = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    clustered = F.normalize(torch.ones(16) + 0.05 * torch.randn(n, 16, generator=g), dim=1)
    a_uniform, a_clustered = lenses.ajne_statistic(uniform, chunk=128), lenses.ajne_statistic(clustered)
    assert abs(a_uniform - 0.25) < 1.5  # E A_n = 1/4 under uniformity
    assert a_clustered > 0.9 * n / 4  # a point mass gives n/4
    # on the circle against the direct double sum
    ang = torch.rand(40, generator=g, dtype=torch.float64) * 2 * math.pi
    pts = torch.stack([ang.cos(), ang.sin()], 1)
    direct = 40 / 4 - sum(float(torch.acos((pts[i] @ pts[j]).clamp(-1, 1)))
                          for i, j in itertools.combinations(range(40), 2)) / (math.pi * 40)
    assert lenses.ajne_statistic(pts, chunk=7) == pytest.approx(direct, rel=1e-10)


# MERU ------------------------------------------------------------------------------------------
C = torch.tensor(1.0, dtype=torch.float64)


def test_a_text_nearer_the_origin_on_the_images_geodesic_entails_it_and_an_off_axis_one_does_not():
    v = torch.zeros(8, dtype=torch.float64)
    v[0] = 2.5
    u = torch.zeros(8, dtype=torch.float64)
    u[1] = 2.5
    image = L.exp_map0(v, C)
    on_axis = L.exp_map0(0.4 * v, C)  # on the geodesic from the origin to the image, nearer the origin
    off_axis = L.exp_map0(u + 0.2 * v, C)  # far and off to the side
    texts, images = torch.stack([on_axis, off_axis]), torch.stack([image, image])
    assert lenses.entailment_satisfied(texts, images, C).tolist() == [True, False]
    assert lenses.entailment_rate(texts, images, C) == 0.5
    d = lenses.origin_distance(torch.stack([image, on_axis]), C)
    assert d.tolist() == pytest.approx([2.5, 1.0])  # = ‖log_map0(x)‖
    # the pairwise exterior angle agrees with lorentz.oxy_angle row by row
    pts = L.exp_map0(torch.randn(5, 8, dtype=torch.float64), C)
    pair = lenses.pairwise_oxy_angle(texts, pts, C)
    for i, j in itertools.product(range(2), range(5)):
        assert float(pair[i, j]) == pytest.approx(float(L.oxy_angle(texts[i:i + 1], pts[j:j + 1], C)[0]), abs=1e-9)


def _hierarchy_pool(geometry):
    """Texts on one ray at decreasing distance (name, subgroup, group) plus distractors."""
    d = 8
    v = torch.zeros(d, dtype=torch.float64)
    v[0] = 3.0
    other = torch.zeros(d, dtype=torch.float64)
    other[2] = 3.0
    tangent = torch.stack([0.9 * v, 0.6 * v, 0.3 * v, other, 0.5 * other, -0.9 * v])
    levels = [0, 1, 2, 0, 1, 0]
    if geometry == "lorentz":
        return L.exp_map0(v, C), L.exp_map0(tangent, C), levels
    # on the sphere, generic texts sit nearer the mean direction of the pool
    mean = F.normalize(tangent.mean(0), dim=0)
    pool = F.normalize(torch.stack([v / 3 + w * mean for w in (0.2, 1.0, 3.0)]
                                   + [other / 3, other / 3 + mean, -v / 3]), dim=1)
    return F.normalize(v, dim=0), pool, levels


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_image_traversal_walks_from_the_name_to_the_root(geometry):
    image, pool, levels = _hierarchy_pool(geometry)
    paths = lenses.image_traversals(image[None], pool, geometry, c=C, steps=60)
    assert paths == [[0, 1, 2, len(pool)]]  # name → subgroup → group → [ROOT]
    truth = [{0: 0, 1: 1, 2: 2}]
    report = lenses.traversal_order(paths, levels, truth)
    assert report["specific_to_generic"] == report["full_chain"] == report["starts_specific"] == 1.0
    assert report["monotone"] == 1.0
    assert report["ancestor_precision"] == 1.0 and report["mean_length"] == 4
    back = lenses.traversal_order([[1, 0, len(pool)], [3, 4]], levels, [{1: 1}, {1: 1}])
    assert back["specific_to_generic"] == back["monotone"] == 0.5 and back["full_chain"] == 0.0
    trivial = lenses.traversal_order([[len(pool)], [0, len(pool)]], levels)
    assert trivial["monotone"] == 1.0 and trivial["specific_to_generic"] == 0.0
    assert back["ancestor_precision"] == 0.5


def test_lorentz_path_to_root_is_the_geodesic_to_the_origin():
    x = L.exp_map0(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), C)
    pts = lenses.path_to_root(x, "lorentz", c=C, steps=4)
    assert torch.allclose(pts[0], x) and torch.allclose(pts[-1], torch.zeros(3, dtype=torch.float64))
    d = L.distance(pts, pts, C)
    assert torch.allclose(d[0, -1], d[0, 2] + d[2, -1])  # points on one geodesic: distances add


# ensembling and the whole report per objective -------------------------------------------------
def test_prompt_ensembling_in_each_geometry():
    g = torch.Generator().manual_seed(5)
    feats = {p: torch.randn(16, generator=g) * (1 + i) for i, p in enumerate(["a {}.", "the {}!", "{} art"])}
    enc = {t.format(c): feats[t] + (3.0 if c == "b" else 0.0) for t in feats for c in ("a", "b")}

    def encode_texts(texts):
        return torch.stack([enc[t] for t in texts])

    templates = list(feats)
    for name in ("clip", "meru"):
        obj = build_objective(ObjectiveConfig(name=name), embed_dim=16)
        got = class_embeddings(obj, encode_texts, ["a", "b"], templates, batch_size=4)
        for row, c in zip(got, ("a", "b"), strict=True):
            f = torch.stack([enc[t.format(c)] for t in templates])
            if name == "clip":  # normalise, mean, normalise
                want = F.normalize(F.normalize(f, dim=1).mean(0), dim=0)
            else:  # tangent-space mean, then the lift
                want = L.exp_map0(obj.log_alpha_text.exp() * f.mean(0), obj.curvature)
                lifted_mean = obj.embed(f, "text").mean(0)
                assert not torch.allclose(row, lifted_mean, atol=1e-4)  # not the mean of lifted points
            assert torch.allclose(row, want, atol=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip", "cloob", "meru", "xclr"])
def test_every_objective_gets_the_same_report(name):
    obj = build_objective(ObjectiveConfig(name=name), embed_dim=12)
    g = torch.Generator().manual_seed(6)
    raw = torch.randn(30, 12, generator=g)
    image, text = obj.embed(raw, "image"), obj.embed(raw + 0.01 * torch.randn(30, 12, generator=g), "text")
    labels = ["x" if i % 2 else "y" for i in range(30)]
    out = evaluate_pairs(obj, image, text, labels=labels, classnames=["x", "y"], templates=["{}"],
                         encode_texts=lambda t: torch.randn(len(t), 12, generator=g))
    assert out["image_to_text_R1"] == out["text_to_image_R10"] == 1.0
    assert 0 <= out["zeroshot_top1"] <= 1 and out["zeroshot_top5"] == 1.0 and out["zeroshot_num_classes"] == 2
    assert 1 <= out["lens/effective_rank_image"] <= 12 and out["lens/alignment"] < 0.01
    assert out["lens/uniformity_image"] < 0
    assert ("lens/entailment_rate" in out) == (name == "meru")
    if name == "meru":
        assert 0 <= out["lens/entailment_rate"] <= 1 and out["lens/origin_distance_text"] > 0
    cls = evaluate_classification(obj, image, torch.tensor([i % 2 for i in range(30)]), image[:2])
    assert cls["num_samples"] == 30 and "lens/ajne_image" in cls and "lens/alignment" not in cls


def test_shipped_templates_are_the_openai_and_simple_lists():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert len(OPENAI_IMAGENET) == 80 and len(SIMPLE) == 7
    assert list(OPENAI_IMAGENET) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert list(SIMPLE) == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def test_the_trainers_evaluate_embeddings_runs_the_shared_scoring():
    import numpy as np

    from cliplab.eval import evaluate_embeddings

    obj = build_objective(ObjectiveConfig(name="meru"), embed_dim=4)
    vocab = {"red": 0, "blue": 1, "green": 2, "an emoji of red": 0, "an emoji of blue": 1, "an emoji of green": 2}

    def enc_text(texts):
        return 3 * F.one_hot(torch.tensor([vocab[t] for t in texts]), 4).float()

    batches = [{"image": 3 * np.eye(4, dtype=np.float32)[:3], "caption": np.array(["red", "blue", "green"], dtype=object),
                "label": np.array(["red", "blue", "green"], dtype=object)}]
    out = evaluate_embeddings(lambda im: im, enc_text, obj, batches, ["an emoji of {}"])
    assert out["val/image_to_text_R1"] == out["val/image_to_text_R10"] == 1.0
    assert out["val/zeroshot_top1"] == out["val/zeroshot_top5"] == 1.0 and out["val/zeroshot_num_classes"] == 3
    assert {"val/lens/alignment", "val/lens/entailment_rate", "val/lens/effective_rank_image"} <= set(out)
    assert "val/lens/alignment" not in evaluate_embeddings(lambda im: im, enc_text, obj, batches, ["{}"], lenses=False)
