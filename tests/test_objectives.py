"""Every preset (and some compositions) against an independent float64 NumPy reference written
straight from the spec's formulas, and 2 gloo processes against 1 process on the full batch."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cliplab.config import ExperimentConfig, ObjectiveConfig, validate, with_overrides
from cliplab.distributed import DistContext
from cliplab.errors import ConfigError
from cliplab.objectives import build_objective
from cliplab.objectives.hopfield import sphere_retrieval

D, N = 5, 6

# ---------------------------------------------------------------------------- references


def _norm(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _lse(m, axis=1):
    mx = m.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(m - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def _ce(logits, targets):
    return np.mean(_lse(logits) - (targets * logits).sum(1))


def _infoloob(a, p, s):
    logits = s * a @ p.T
    masked = np.where(np.eye(len(a), dtype=bool), -np.inf, logits)
    return np.mean(_lse(masked) - np.diag(logits))


def _hop(q, m, beta):
    w = np.exp(beta * q @ m.T - _lse(beta * q @ m.T)[:, None])
    return _norm(w @ m)


def ref_clip(x, y, s=1 / 0.07, **_):
    x, y = _norm(x), _norm(y)
    return (_ce(s * x @ y.T, np.eye(len(x))) + _ce(s * y @ x.T, np.eye(len(x)))) / 2


def ref_siglip(x, y, s=10.0, b=-10.0, **_):
    x, y = _norm(x), _norm(y)
    labels = 2 * np.eye(len(x)) - 1
    return -np.mean(np.sum(np.log(1 / (1 + np.exp(-labels * (s * x @ y.T + b)))), axis=1))


def ref_cloob(x, y, s=30.0, beta=8.0, **_):
    x, y = _norm(x), _norm(y)
    u_x, u_y, v_x, v_y = _hop(x, x, beta), _hop(y, x, beta), _hop(x, y, beta), _hop(y, y, beta)
    return _infoloob(u_x, u_y, s) + _infoloob(v_y, v_x, s)


def _lift(f, alpha, c):
    v = alpha * f
    r = np.sqrt(c) * np.linalg.norm(v, axis=1, keepdims=True)
    return np.sinh(r) * v / r


def _time(z, c):
    return np.sqrt(1 / c + (z * z).sum(1))


def ref_meru(x, y, s=1 / 0.07, alpha=D ** -0.5, c=1.0, lam=0.2, k=0.1, **_):
    zx, zy = _lift(x, alpha, c), _lift(y, alpha, c)
    inner = zx @ zy.T - np.outer(_time(zx, c), _time(zy, c))
    dist_ = np.arccosh(np.maximum(-c * inner, 1 + 1e-12)) / np.sqrt(c)
    con = (_ce(-s * dist_, np.eye(len(x))) + _ce(-s * dist_.T, np.eye(len(x)))) / 2
    aperture = np.arcsin(np.clip(2 * k / (np.sqrt(c) * np.linalg.norm(zy, axis=1)), -1, 1))
    c_in = c * np.diag(inner)  # <y_i, x_i>_L
    cos = (_time(zx, c) + c_in * _time(zy, c)) / (np.linalg.norm(zy, axis=1) * np.sqrt(c_in**2 - 1))
    angle = np.arccos(np.clip(cos, -1, 1))
    return con + lam * np.mean(np.maximum(angle - aperture, 0))


def ref_xclr(x, y, x2, e, s=10.0, tau_s=0.1, **_):
    z, z2 = _norm(x), _norm(x2)
    e = _norm(e)
    targets = np.exp(e @ e.T / tau_s - _lse(e @ e.T / tau_s)[:, None])
    return _ce(s * z @ z2.T, targets)


def ref_soft_infoloob(x, y, e, s=1 / 0.07, tau_s=0.1, **_):
    """X-CLR targets with the InfoLOOB denominator, image↔text, summed directions."""
    x, y, e = _norm(x), _norm(y), _norm(e)
    t = np.exp(e @ e.T / tau_s - _lse(e @ e.T / tau_s)[:, None])

    def one(a, p):
        logits = s * a @ p.T
        masked = np.where(np.eye(len(a), dtype=bool), -np.inf, logits)
        return np.mean(_lse(masked) - (t * logits).sum(1))

    return one(x, y) + one(y, x)


CASES = {
    "clip": (dict(name="clip"), ref_clip),
    "siglip": (dict(name="siglip"), ref_siglip),
    "cloob": (dict(name="cloob"), ref_cloob),
    "meru": (dict(name="meru"), ref_meru),
    "xclr": (dict(name="xclr"), ref_xclr),
    "soft+infoloob": (dict(name="xclr", denominator="infoloob", soft_target_views="image_text",
                           temperature=0.07), ref_soft_infoloob),
}


def _inputs(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(n, D)) for k in ("x", "y", "x2", "e")}


def _torch_loss(obj, arrays, requires_grad=True, ctx=DistContext()):
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for k, v in arrays.items()}
    extras = {"image_features_2": t["x2"], "caption_embeddings": t["e"]}
    return obj.loss(t["x"], t["y"], ctx, extras), t


def _numeric_grad(f, arrays, key, eps=1e-6):
    a = {k: v.copy() for k, v in arrays.items()}
    g = np.zeros_like(a[key])
    for idx in np.ndindex(a[key].shape):
        old = a[key][idx]
        a[key][idx] = old + eps
        hi = f(**a)
        a[key][idx] = old - eps
        lo = f(**a)
        a[key][idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_float64_reference(case):
    overrides, ref = CASES[case]
    obj = build_objective(ObjectiveConfig(**overrides), embed_dim=D).double()
    arrays = _inputs()
    out, t = _torch_loss(obj, arrays)
    # the reference takes the module's scalars as stored (log-parameters rounded to float32)
    scalars = {"s": obj.log_scale.exp().item()}
    for name, key in (("log_beta", "beta"), ("log_curvature", "c"), ("log_alpha_image", "alpha")):
        if hasattr(obj, name):
            scalars[key] = getattr(obj, name).exp().item()
    if hasattr(obj, "bias"):
        scalars["b"] = obj.bias.item()
    assert out.loss.item() == pytest.approx(ref(**arrays, **scalars), abs=1e-6)
    out.loss.backward()
    for key in ("x", "y", "x2"):
        expected = _numeric_grad(lambda **a: ref(**a, **scalars), arrays, key)
        got = t[key].grad.numpy() if t[key].grad is not None else np.zeros_like(expected)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"{case}: d loss / d {key}")
    # learnable scalars (stored as logs): d loss / d log θ = θ · d ref / d θ, central differences
    stores = {"s": ["log_scale"], "beta": ["log_beta"], "c": ["log_curvature"],
              "alpha": ["log_alpha_image", "log_alpha_text"]}  # the reference shares one α
    for key, names in stores.items():
        params = [getattr(obj, n) for n in names if hasattr(obj, n) and getattr(obj, n).requires_grad]
        if key not in scalars or not params:
            continue
        h = 1e-6 * scalars[key]
        hi, lo = ({**scalars, key: scalars[key] + d} for d in (h, -h))
        expected = scalars[key] * (ref(**arrays, **hi) - ref(**arrays, **lo)) / (2 * h)
        got = sum(p.grad.item() for p in params)
        assert got == pytest.approx(expected, abs=1e-6, rel=1e-6), f"{case}: d loss / d {names}"
    if hasattr(obj, "bias"):
        hi, lo = ({**scalars, "b": scalars["b"] + d} for d in (1e-6, -1e-6))
        assert obj.bias.grad.item() == pytest.approx((ref(**arrays, **hi) - ref(**arrays, **lo)) / 2e-6, abs=1e-6)


def test_compositions_build_and_give_finite_losses():
    arrays = _inputs(1)
    for overrides in (dict(name="cloob", geometry="lorentz"), dict(name="meru", retrieval="hopfield"),
                      dict(name="clip", geometry="lorentz", denominator="sigmoid"),
                      dict(name="xclr", soft_target_views="image_text")):
        out, _ = _torch_loss(build_objective(ObjectiveConfig(**overrides), embed_dim=D).double(), arrays)
        assert torch.isfinite(out.loss), overrides
        out.loss.backward()


@pytest.mark.parametrize("case", list(CASES) + ["cloob+lorentz"])
def test_bf16_autocast_keeps_loss_and_gradients_finite(case):
    overrides = dict(name="cloob", geometry="lorentz") if case == "cloob+lorentz" else CASES[case][0]
    obj = build_objective(ObjectiveConfig(**overrides), embed_dim=64)
    torch.manual_seed(0)
    feats = {k: (torch.randn(32, 64) * 3).requires_grad_() for k in ("x", "y", "x2", "e")}
    feats["y"].data[1] = feats["y"].data[0]  # duplicate texts: zero distances, ties
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj = torch.nn.Linear(64, 64)
        x, y, x2 = proj(feats["x"]), proj(feats["y"]), proj(feats["x2"])
        out = obj.loss(x, y, DistContext(), {"image_features_2": x2, "caption_embeddings": feats["e"]})
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in [*feats.items(), *obj.named_parameters()]:
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_lean_lorentz_logits_equal_the_plain_formula_with_exact_gradients():
    from cliplab.objectives import lorentz as L

    torch.manual_seed(0)
    x = (torch.randn(5, D, dtype=torch.float64) * 0.7).requires_grad_()
    y = torch.randn(7, D, dtype=torch.float64) * 0.7
    y[0] = x.detach()[0]  # an identical pair: the clamp is active there
    y.requires_grad_()
    c = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    plain = -s * L.distance(x, y, c)
    lean = L.scaled_neg_distance(x, y, c, s)
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-12)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad((plain * g).sum(), (x, y, c, s)),
                    torch.autograd.grad((lean * g).sum(), (x, y, c, s)), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(L.scaled_neg_distance, (x, y, c, s))
    np.testing.assert_allclose(L.paired_distance(x, y[:5], c).detach(), torch.diagonal(L.distance(x, y, c)).detach())


def test_the_fused_and_in_place_lorentz_elementwise_steps_agree():
    """CUDA runs the functional steps fused by torch.compile, CPU the in-place ones."""
    from cliplab.objectives import lorentz as L

    torch.manual_seed(1)
    tx, ty = 1 + torch.rand(6, dtype=torch.float64), 1 + torch.rand(9, dtype=torch.float64)
    xy = torch.outer(tx, ty) - 1 / 1.3 - torch.rand(6, 9, dtype=torch.float64) * 2  # p = t t' − x·y
    xy[0, :3] = torch.outer(tx, ty)[0, :3] - 0.5  # p = 0.5: below the clamp, no gradient there
    grad = torch.randn(6, 9, dtype=torch.float64)
    c, s = torch.tensor(1.3, dtype=torch.float64), torch.tensor(12.0, dtype=torch.float64)
    torch.testing.assert_close(L._forward_pointwise_inplace(xy.clone(), tx, ty, c, s, 1e-12),
                               L._forward_pointwise(xy, tx, ty, c, s, 1e-12), rtol=0, atol=1e-12)
    functional = L._backward_pointwise(xy, tx, ty, grad, c, s, 1e-12)
    for a, b in zip(functional, L._backward_pointwise_inplace(xy.clone(), tx, ty, grad, c, s, 1e-12), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert (functional[0][0, :3] == 0).all() and (functional[0][1:] != 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_fused_lorentz_logits_match_the_float64_formula():
    from cliplab.objectives import lorentz as L

    torch.manual_seed(0)
    one = torch.tensor(1.0, dtype=torch.float64)
    v = torch.randn(300, 64, dtype=torch.float64) / 8
    x64 = L.exp_map0(v, one)
    near = L.exp_map0(v[:50] + torch.randn(50, 64, dtype=torch.float64) / 100, one)  # distances ≈ 0.08
    y64 = torch.cat([near, L.exp_map0(torch.randn(400, 64, dtype=torch.float64) / 8, one)])
    g64 = torch.randn(300, 450, dtype=torch.float64)
    results = {}
    for name, dtype, device in (("reference", torch.float64, "cpu"), ("fused", torch.float32, "cuda")):
        x, y = (t.to(device, dtype).detach().requires_grad_() for t in (x64, y64))
        c = torch.tensor(1.3, dtype=dtype, device=device, requires_grad=True)
        s = torch.tensor(12.0, dtype=dtype, device=device, requires_grad=True)
        logits = (-s * L.distance(x, y, c)) if name == "reference" else L.scaled_neg_distance(x, y, c, s)
        (logits * g64.to(device, dtype)).sum().backward()
        results[name] = [t.detach().double().cpu() for t in (logits, x.grad, y.grad, c.grad, s.grad)]
    assert not L._COMPILE_FAILED
    for what, a, b in zip(("logits", "x", "y", "c", "s"), results["reference"], results["fused"], strict=True):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-3, msg=what)


@pytest.mark.parametrize("name", ["clip", "siglip", "meru"])
def test_under_bf16_autocast_a_positive_logit_equals_its_matrix_entry(name):
    obj = build_objective(ObjectiveConfig(name=name), embed_dim=64)
    torch.manual_seed(0)
    a = obj.embed(torch.randn(16, 64), "image")
    cols = obj.embed(torch.randn(48, 64), "text")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matrix = obj._logits(a, cols)
        positive = obj._positive_logits(a, cols[16:32])
    assert matrix.dtype == positive.dtype == torch.float32
    torch.testing.assert_close(positive, matrix.diagonal(16), rtol=0, atol=1e-5)


@pytest.mark.parametrize("geometry", ["euclidean", "lorentz"])
def test_chunked_recomputed_hopfield_retrieval_equals_the_plain_one(geometry):
    arrays = _inputs(3)
    results = []
    for chunk in (None, 2, 4):  # 3 chunks; 2 uneven chunks
        obj = build_objective(ObjectiveConfig(name="cloob", geometry=geometry, learn_beta=True,
                                              learn_temperature=True, hopfield_chunk=chunk), embed_dim=D).double()
        out, t = _torch_loss(obj, arrays)
        out.loss.backward()
        results.append([out.loss.detach(), t["x"].grad, t["y"].grad, *(p.grad for p in obj.parameters())])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def _plain_retrieval(q, m, beta):
    """softmax(β q Mᵀ) M by plain autograd (keeps the B × N weights)."""
    return torch.softmax((beta * q @ m.T).float(), dim=1) @ m


@pytest.mark.parametrize("chunk", [None, 3, 7])
def test_lean_sphere_retrieval_passes_gradcheck(chunk):
    torch.manual_seed(0)
    q = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    m = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: sphere_retrieval(a, b, c, chunk), (q, m, beta))
    # and it is the retrieval itself, by the NumPy formula
    scores = 1.7 * q.detach().numpy() @ m.detach().numpy().T
    expected = np.exp(scores - _lse(scores)[:, None]) @ m.detach().numpy()
    np.testing.assert_allclose(sphere_retrieval(q, m, beta, chunk).detach().numpy(), expected, rtol=0, atol=1e-12)


def test_lean_sphere_retrieval_keeps_no_queries_by_memory_tensor_for_backward():
    torch.manual_seed(0)
    q = torch.randn(32, 8, requires_grad=True)
    m = torch.randn(96, 8, requires_grad=True)
    beta = torch.tensor(8.0, requires_grad=True)
    for retrieve, keeps_bxn in ((lambda: _plain_retrieval(q, m, beta), True),
                                (lambda: sphere_retrieval(q, m, beta, 16), False)):
        saved: list[tuple[int, ...]] = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            retrieve().sum().backward()
        assert ((32, 96) in saved) is keeps_bxn, saved


def test_lean_sphere_retrieval_under_bf16_autocast_matches_plain_autograd():
    grads = []
    for retrieve in (_plain_retrieval, lambda a, b, c: sphere_retrieval(a, b, c, 8)):
        torch.manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(24, 16), dim=1).requires_grad_()
        m = torch.nn.functional.normalize(torch.randn(40, 16), dim=1).requires_grad_()
        beta = torch.tensor(8.0, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = retrieve(q, m, beta)
            (out.float() * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append([out.float().detach(), q.grad, m.grad, beta.grad])
        assert all(torch.isfinite(g).all() for g in grads[-1])
    for lean, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(lean, plain, rtol=0, atol=0.02)  # both ≈ 0.01 from fp32


def test_zero_distance_has_a_finite_gradient():
    obj = build_objective(ObjectiveConfig(name="meru"), embed_dim=D).double()
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    out = obj.loss(x, x.clone(), DistContext())  # every positive pair at distance 0
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_parameter_stores_inits_and_clamps():
    meru = build_objective(ObjectiveConfig(name="meru"), embed_dim=512)
    assert meru.log_alpha_image.item() == pytest.approx(math.log(512 ** -0.5))
    assert meru.curvature.item() == pytest.approx(1.0)
    with torch.no_grad():
        meru.log_curvature.fill_(5.0)
        meru.log_alpha_text.fill_(1.0)
        meru.log_scale.fill_(9.0)
    meru.clamp_()
    assert meru.curvature.item() == pytest.approx(10.0)
    assert meru.log_alpha_text.item() == 0.0 and meru.log_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        meru.log_curvature.fill_(-9.0)
    meru.clamp_()
    assert meru.curvature.item() == pytest.approx(0.1)

    clip = build_objective(ObjectiveConfig(name="clip", temperature=0.07))
    assert clip.log_scale.item() == pytest.approx(math.log(1 / 0.07)) and clip.log_scale.requires_grad
    with torch.no_grad():
        clip.log_scale.fill_(-3.0)
    clip.clamp_()
    assert clip.log_scale.item() == 0.0  # s >= 1
    assert not build_objective(ObjectiveConfig(name="clip", learn_temperature=False)).log_scale.requires_grad

    siglip = build_objective(ObjectiveConfig(name="siglip"))
    assert siglip.log_scale.exp().item() == pytest.approx(10.0) and siglip.bias.item() == -10.0
    cloob = build_objective(ObjectiveConfig(name="cloob"))
    assert cloob.log_beta.exp().item() == pytest.approx(8.0) and not cloob.log_beta.requires_grad
    assert cloob.log_scale.exp().item() == pytest.approx(30.0) and not cloob.log_scale.requires_grad
    learnable = build_objective(ObjectiveConfig(name="cloob", learn_beta=True, learn_temperature=True))
    assert learnable.log_beta.requires_grad and learnable.log_scale.requires_grad
    assert build_objective(ObjectiveConfig(name="xclr")).log_scale.exp().item() == pytest.approx(10.0)


def test_the_objective_declares_its_data_needs_and_keeps_its_geometrys_scalars_under_flat_names():
    from cliplab.objectives import DataNeeds, Hyperboloid, Sphere, data_needs

    for overrides, needs in ((dict(name="clip"), DataNeeds()), (dict(name="meru"), DataNeeds()),
                             (dict(name="xclr"), DataNeeds(views=2, caption_embeddings=True)),
                             (dict(name="xclr", soft_target_views="image_text"), DataNeeds(caption_embeddings=True))):
        cfg = ObjectiveConfig(**overrides)
        assert data_needs(cfg) == build_objective(cfg).data_needs == needs, overrides
    assert isinstance(build_objective(ObjectiveConfig(name="clip")).geometry, Sphere)
    meru = build_objective(ObjectiveConfig(name="meru"), embed_dim=D).double()
    assert isinstance(meru.geometry, Hyperboloid)
    assert list(meru.state_dict()) == ["log_scale", "log_alpha_image", "log_alpha_text", "log_curvature"]
    meru.load_state_dict({**meru.state_dict(), "log_curvature": torch.tensor(0.5, dtype=torch.float64)})
    assert meru.geometry.curvature.item() == pytest.approx(math.exp(0.5))  # one parameter, cast and loaded


@pytest.mark.parametrize("overrides, message", [
    ({"objective.name": "clip", "objective.entailment_weight": 0.2}, "needs objective.geometry=lorentz"),
    ({"objective.geometry": "spherical"}, "objective.geometry 'spherical'"),
    ({"objective.name": "meru", "objective.curvature_init": 20.0}, "curvature_init must lie"),
    ({"objective.name": "xclr"}, "soft targets"),
    ({"objective.name": "cloob", "objective.hopfield_chunk": 0}, "hopfield_chunk must be >= 1"),
    ({"objective.name": "cloob", "objective.lr_scale": 0.0}, "lr_scale must be > 0"),
])
def test_objective_config_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(with_overrides(ExperimentConfig(), {"data.train": "x", **overrides}))


# ---------------------------------------------------------------------------- 2 gloo ranks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_CASES = {**{k: v[0] for k, v in CASES.items()},
              "cloob+lorentz": dict(name="cloob", geometry="lorentz", learn_beta=True)}


def _rank(rank, world, port, arrays, queue):
    """One rank: every case's local loss, input gradients and (all-reduced) scalar gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for case, overrides in DIST_CASES.items():
            obj = build_objective(ObjectiveConfig(**overrides), embed_dim=D).double()
            b = N // world
            local = {k: v[rank * b:(rank + 1) * b] for k, v in arrays.items()}
            out, t = _torch_loss(obj, local, ctx=DistContext.current())
            out.loss.backward()
            grads = {k: (v.grad.numpy() if v.grad is not None else np.zeros_like(local[k])) for k, v in t.items()}
            scalars = {}
            for name, p in obj.named_parameters():
                if p.grad is not None:
                    g = p.grad.clone()
                    dist.all_reduce(g)  # what DDP does, before its 1/W averaging
                    scalars[name] = g.item() / world
            results[case] = (out.loss.item(), grads, scalars)
        queue.put((rank, results))
        dist.barrier()  # both ranks are done with gloo before either tears it down (an early teardown aborted a rank)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    arrays = _inputs(2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, arrays, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return arrays, results


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_two_processes_equal_one_process(case, two_rank_results):
    arrays, results = two_rank_results
    obj = build_objective(ObjectiveConfig(**DIST_CASES[case]), embed_dim=D).double()
    full, t = _torch_loss(obj, arrays)
    full.loss.backward()
    ranks = [results[0][case], results[1][case]]
    assert np.mean([r[0] for r in ranks]) == pytest.approx(full.loss.item(), abs=1e-6)
    for key in ("x", "y", "x2"):
        dist_grad = np.concatenate([r[1][key] for r in ranks]) / 2  # DDP's 1/W
        full_grad = t[key].grad.numpy() if t[key].grad is not None else np.zeros_like(dist_grad)
        np.testing.assert_allclose(dist_grad, full_grad, atol=1e-6, err_msg=f"{case}: {key}")
    for name, p in obj.named_parameters():
        if p.grad is not None:
            assert ranks[0][2][name] == pytest.approx(p.grad.item(), abs=1e-6), name
