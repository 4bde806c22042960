"""Paper lenses on a set of embeddings, written once for every objective. Pure torch.

Conventions:

- ``x``/``y`` are N × D embeddings *in the objective's geometry* (what ``objective.embed``
  returns): unit vectors on the sphere, or the space components of points on the hyperboloid
  of curvature ``-c`` (see :mod:`cliplab.objectives.lorentz`).
- The objective's geometry is read from its public :attr:`~cliplab.objectives.Objective.geometry`
  (:func:`geometry_of`, :func:`curvature_of`, :func:`aperture_k_of`); the lenses take its name
  and, on the hyperboloid, ``c`` (float64) and the cone constant ``K``.
- The **Euclidean view** of an embedding (:func:`euclidean_view`) is the embedding itself on
  the sphere and its tangent vector at the origin, ``log_map0(x)``, on the hyperboloid: the
  chart in which geodesics through the origin are straight lines. Its **direction** is the
  Euclidean view scaled to unit length. Direction-based lenses (alignment, uniformity, Ajne)
  are therefore computed on the unit sphere for every geometry, so their numbers compare
  across objectives; for Lorentz embeddings they ignore the radius (genericity), which
  :func:`origin_distance` measures instead.
- Pairwise sums run in row chunks, so memory is O(chunk × N), and in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cliplab.objectives import lorentz as L

ROOT = "[ROOT]"


# geometry helpers ------------------------------------------------------------------------------
def geometry_of(objective) -> str:
    """``"euclidean"`` or ``"lorentz"``: the name of the objective's geometry."""
    return objective.geometry.name


def curvature_of(objective) -> torch.Tensor | None:
    """The (positive) curvature magnitude ``c`` of a hyperbolic objective, detached, in float64;
    None on the sphere."""
    geometry = objective.geometry
    return geometry.curvature.detach().double() if geometry.cones else None


def aperture_k_of(objective) -> float | None:
    """MERU's cone constant ``K`` of a hyperbolic objective; None on the sphere (no cones)."""
    geometry = objective.geometry
    return geometry.aperture_k if geometry.cones else None


def euclidean_view(x: torch.Tensor, geometry: str = "euclidean", c: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` on the sphere; ``log_map0(x, c)`` (the tangent vector at the origin) on the hyperboloid."""
    x = x.detach().double()
    if geometry == "lorentz":
        return L.log_map0(x, torch.as_tensor(c, dtype=torch.float64))
    return x


def directions(x: torch.Tensor, geometry: str = "euclidean", c: torch.Tensor | None = None) -> torch.Tensor:
    """The Euclidean view scaled to unit length (float64)."""
    return F.normalize(euclidean_view(x, geometry, c), dim=-1)


# Euclidean lenses ------------------------------------------------------------------------------
def effective_rank(x: torch.Tensor, threshold: float = 0.99, chunk: int = 4096) -> int:
    """The number of eigenvalues of the covariance of ``x`` (N × D, rows are samples, centred by
    their mean, float64) that hold ``threshold`` of the total variance: the smallest ``k`` with
    ``λ_1 + … + λ_k ≥ threshold · Σ λ`` (eigenvalues in decreasing order). 0 for constant data.

    Points spanning an r-dimensional affine subspace with equal spread give ``r``. The covariance
    is accumulated in row chunks (D × D memory)."""
    x = x.detach().double()
    n, d = x.shape
    if n < 2:
        return 0
    mean = x.mean(dim=0)
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        xc = x[s:s + chunk] - mean
        cov += xc.T @ xc
    cov /= n - 1
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
    total = float(eig.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(eig, 0)
    return int((cum < threshold * total * (1 - 1e-12)).sum()) + 1


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment of positive pairs: ``E_i ‖x_i − y_i‖^α`` (α = 2), on the rows as
    given (pass unit vectors, e.g. :func:`directions`). 0 is perfect; on the sphere at most 4."""
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 1024) -> float:
    """Wang & Isola's uniformity: ``log E_{i<j} exp(−t ‖x_i − x_j‖²)`` (t = 2) over all distinct
    pairs of rows, as given (pass unit vectors). Lower is more uniform; 0 means every point is
    the same; about −4 is the limit for unit vectors in high dimension (t = 2)."""
    x = x.detach().double()
    n = len(x)
    if n < 2:
        return float("nan")
    parts = []
    for s in range(0, n, chunk):
        rows = x[s:s + chunk]
        d2 = torch.cdist(rows, x).pow(2)
        upper = torch.arange(s, s + len(rows), device=x.device)[:, None] < torch.arange(n, device=x.device)[None, :]
        parts.append(torch.logsumexp((-t * d2)[upper], dim=0))  # j > i only
    return float(torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1) / 2))


def ajne_statistic(x: torch.Tensor, chunk: int = 1024) -> float:
    """The Ajne–Prentice statistic of uniformity on the sphere (Ajne 1968 on the circle,
    Prentice 1978 on S^{D−1}): ``A_n = n/4 − (1/(π n)) Σ_{i<j} ψ_ij``, where ``ψ_ij`` is the
    angle between directions ``x_i`` and ``x_j`` (rows are normalised here).

    Under uniformity ``E ψ = π/2`` in any dimension, so ``E A_n = 1/4``; large values reject
    uniformity (all points equal gives ``n/4``). Compare across set sizes with ``4 A_n / n``."""
    x = F.normalize(x.detach().double(), dim=-1)
    n = len(x)
    if n < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, n, chunk):
        rows = x[s:s + chunk]
        angles = torch.acos((rows @ x.T).clamp(-1.0, 1.0))
        upper = torch.arange(s, s + len(rows), device=x.device)[:, None] < torch.arange(n, device=x.device)[None, :]
        total += angles[upper].sum().cpu()  # j > i only
    return float(n / 4 - total / (math.pi * n))


# Lorentz lenses --------------------------------------------------------------------------------
def entailment_satisfied(texts: torch.Tensor, images: torch.Tensor, c, k: float = 0.1) -> torch.Tensor:
    """Row-wise booleans: image ``x_i`` lies inside the entailment cone of text ``y_i``, i.e.
    ``oxy_angle(y_i, x_i) ≤ half_aperture(y_i)`` (MERU; :mod:`cliplab.objectives.lorentz`)."""
    c = torch.as_tensor(c, dtype=torch.float64)
    return L.cone_violation(texts.detach().double(), images.detach().double(), c, k) <= 0


def entailment_rate(texts: torch.Tensor, images: torch.Tensor, c, k: float = 0.1) -> float:
    """Fraction of pairs (text_i, image_i) whose image lies inside the text's entailment cone."""
    return float(entailment_satisfied(texts, images, c, k).double().mean())


def origin_distance(x: torch.Tensor, c) -> torch.Tensor:
    """Geodesic distance of each point to the hyperboloid's origin, in float64
    (:func:`cliplab.objectives.lorentz.origin_distance`)."""
    return L.origin_distance(x.detach().double(), torch.as_tensor(c, dtype=torch.float64))


# traversals ------------------------------------------------------------------------------------
def pairwise_oxy_angle(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """:func:`cliplab.objectives.lorentz.oxy_angle` for every pair (``x_i``, ``y_j``) at once
    (``len(x)`` × ``len(y)``, no N × M × D intermediate): the exterior angle at ``x_i``
    between the origin and ``y_j``, with the same clamps."""
    c = torch.as_tensor(c, dtype=x.dtype)
    eps = L.eps_for(x.dtype)
    tx, ty = L.time_component(x, c), L.time_component(y, c)
    c_inner = c * L.inner(x, y, c)
    numer = ty[None, :] + c_inner * tx[:, None]
    denom = x.norm(dim=-1)[:, None] * torch.sqrt(torch.clamp(c_inner**2 - 1, min=eps)) + eps
    return torch.acos(torch.clamp(numer / denom, -1 + eps, 1 - eps))


def path_to_root(x: torch.Tensor, geometry: str, *, c=None, root: torch.Tensor | None = None,
                 steps: int = 50) -> torch.Tensor:
    """``steps + 1`` points from ``x`` (a single D-vector) to [ROOT], as (steps + 1) × D.

    Lorentz: the geodesic from ``x`` to the origin, ``exp_map0((1 − w) · log_map0(x))`` for
    ``w = 0, 1/steps, …, 1`` (geodesics through the origin are straight lines in its tangent
    space), so the last point is the origin. Sphere: ``normalize((1 − w) x + w · root)``,
    where ``root`` is a unit vector (MERU uses the mean text embedding of the pool for CLIP)."""
    w = torch.linspace(0, 1, steps + 1, dtype=torch.float64, device=x.device)[:, None]
    x = x.detach().double()
    if geometry == "lorentz":
        c = torch.as_tensor(c, dtype=torch.float64)
        return L.exp_map0((1 - w) * L.log_map0(x[None], c), c)
    if root is None:
        raise ValueError("a spherical traversal needs a root direction")
    return F.normalize((1 - w) * x[None] + w * root.double()[None], dim=-1)


def image_traversals(images: torch.Tensor, pool: torch.Tensor, geometry: str, *, c=None, k: float | None = 0.1,
                     steps: int = 50, require_entailment: bool = True) -> list[list[int]]:
    """MERU's image traversals (Desai et al. 2023, sec. "image traversals"): move each image
    embedding along :func:`path_to_root` in ``steps`` steps and at every step retrieve the
    nearest text of ``pool`` (P × D, in the same geometry); return, per image, the pool indices
    of the *distinct* texts retrieved, in order of first appearance, from the image to the root.

    Index ``P`` (one past the pool) stands for [ROOT]. Nearest is by negative geodesic distance
    on the hyperboloid (with [ROOT] the origin) and by cosine on the sphere (with [ROOT] the
    normalised mean of the pool). With ``require_entailment`` on the hyperboloid, as in MERU,
    only texts whose entailment cone contains the point may be retrieved; [ROOT] entails
    everything, so the last step always retrieves it. ``c`` and ``k`` (the cone constant) are
    the hyperboloid's and unused on the sphere."""
    pool = pool.detach().double()
    paths = []
    if geometry == "lorentz":
        c = torch.as_tensor(c, dtype=torch.float64)
        root = torch.zeros(1, pool.shape[1], dtype=torch.float64, device=pool.device)
        aperture = L.half_aperture(pool, c, k)  # P
        for x in images:
            pts = path_to_root(x, geometry, c=c, steps=steps)  # S × D
            scores = -L.distance(pts, torch.cat([pool, root]), c)  # S × (P + 1)
            if require_entailment:
                outside = pairwise_oxy_angle(pool, pts, c).T > aperture[None]  # S × P
                scores[:, :-1] = scores[:, :-1].masked_fill(outside, -math.inf)
            paths.append(_distinct(scores.argmax(dim=1).tolist()))
    else:
        root = F.normalize(pool.mean(dim=0), dim=-1)
        items = torch.cat([pool, root[None]])
        for x in images:
            pts = path_to_root(x, geometry, root=root, steps=steps)
            paths.append(_distinct((pts @ items.T).argmax(dim=1).tolist()))
    return paths


def _distinct(seq: Sequence[int]) -> list[int]:
    seen, out = set(), []
    for i in seq:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def traversal_order(paths: Sequence[Sequence[int]], levels: Sequence[int],
                    truth: Sequence[dict[int, int]] | None = None) -> dict[str, float]:
    """How traversals move through a hierarchy. ``levels[p]`` is the level of pool item ``p``
    (0 = most specific, e.g. an emoji's name; larger = more generic); [ROOT] (index
    ``len(levels)``) is one level above the top. Returns:

    - ``monotone``: fraction of paths whose levels never decrease (never go back to a more
      specific level after a more generic one); a path of [ROOT] alone is trivially monotone;
    - ``specific_to_generic``: fraction of paths that are monotone *and* visit at least two
      levels below [ROOT] (they really move from a specific text to a more generic one);
    - ``full_chain``: fraction that are monotone and visit every level 0…top;
    - ``starts_specific``: fraction whose first text is of level 0;
    - ``mean_length``: mean number of distinct texts retrieved (with [ROOT]);
    - ``mean_levels``: mean number of distinct levels visited (with [ROOT]);
    - ``ancestor_precision`` (when ``truth`` is given: per path, ``{level: pool index}`` of the
      image's own ancestors): of the retrieved texts above level 0 and below [ROOT], the
      fraction that are the image's own ancestor at their level (NaN when none was retrieved).
    """
    levels = list(levels) + [max(levels, default=-1) + 1]  # [ROOT]
    top = levels[-1]
    n = max(len(paths), 1)
    monotone = moves = full = starts = 0
    length = nlevels = 0.0
    hits = tries = 0
    for i, path in enumerate(paths):
        lv = [levels[p] for p in path]
        ok = all(a <= b for a, b in zip(lv, lv[1:], strict=False))
        monotone += ok
        moves += ok and len(set(lv) - {top}) >= 2
        full += ok and set(range(top + 1)) <= set(lv)
        starts += bool(lv) and lv[0] == 0
        length += len(path)
        nlevels += len(set(lv))
        if truth is not None:
            for p in path:
                if 0 < levels[p] < top:
                    tries += 1
                    hits += truth[i].get(levels[p]) == p
    out = {"monotone": monotone / n, "specific_to_generic": moves / n, "full_chain": full / n, "starts_specific": starts / n,
           "mean_length": length / n, "mean_levels": nlevels / n}
    if truth is not None:
        out["ancestor_precision"] = hits / tries if tries else float("nan")
    return out


# everything at once ----------------------------------------------------------------------------
@torch.no_grad()
def lens_report(objective, image_emb: torch.Tensor, text_emb: torch.Tensor | None = None, *,
                max_pairwise: int | None = 8192) -> dict[str, float]:
    """Every lens that applies, for embeddings in ``objective``'s geometry (rows of
    ``text_emb`` pair with rows of ``image_emb``; ``text_emb`` None gives the image-only lenses).
    The pairwise lenses (uniformity, Ajne), O(N²), use the first ``max_pairwise`` rows when
    there are more (None: all); the others use every row.

    Keys: ``effective_rank_{image,text}``, ``uniformity_{image,text}``, ``ajne_{image,text}``,
    ``alignment``; in Lorentz geometry also ``entailment_rate``, ``origin_distance_{image,text}``
    and ``text_nearer_origin_rate`` (pairs whose text is nearer the origin than its image)."""
    geometry, c = geometry_of(objective), curvature_of(objective)
    out: dict[str, float] = {}
    sets = {"image": image_emb} if text_emb is None else {"image": image_emb, "text": text_emb}
    dirs = {}
    for name, emb in sets.items():
        dirs[name] = directions(emb, geometry, c)
        out[f"effective_rank_{name}"] = float(effective_rank(euclidean_view(emb, geometry, c)))
        some = dirs[name][:max_pairwise] if max_pairwise else dirs[name]
        out[f"uniformity_{name}"] = uniformity(some)
        out[f"ajne_{name}"] = ajne_statistic(some)
    if text_emb is not None:
        out["alignment"] = alignment(dirs["image"], dirs["text"])
    if geometry == "lorentz":
        di = origin_distance(image_emb, c)
        out["origin_distance_image"] = float(di.mean())
        if text_emb is not None:
            dt = origin_distance(text_emb, c)
            out["origin_distance_text"] = float(dt.mean())
            out["text_nearer_origin_rate"] = float((dt < di).double().mean())
            out["entailment_rate"] = entailment_rate(text_emb, image_emb, c, aperture_k_of(objective))
    return out
