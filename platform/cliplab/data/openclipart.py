"""A second real corpus: Open Clip Art, from Debian's ``openclipart-png`` and ``openclipart-svg``.

The two packages hold the same drawings twice, ``/usr/share/openclipart/png/CATEGORY/…/NAME.png``
and ``…/svg/CATEGORY/…/NAME.svg`` (22 top-level categories; 6,900 distinct PNGs, the other 1,221
paths are symlinks that file a drawing under a second folder). The image is the PNG; the caption
comes from its SVG's Dublin Core metadata (:mod:`cliplab.data.clipart_captions`):

* the ``dc:title``, cleaned (underscores, spacing, a ``Clipart by NAME - `` prefix), else the
  file name; a title five or more drawings share is a collection's name (``gramastar``, ``Lemon
  SVG theme``), and a drawing whose own name says more than it (its name has a word of three
  letters or more and lacks some word of the title) is captioned by its name instead;
* then the description's first sentence, when it adds something: three words or more, no URL or
  e-mail address, not a repeat of the title, not shared by five or more drawings;

at most 30 words (the text tower reads 32 tokens). The category is the top-level folder;
categories with fewer than ``min_per_category`` drawings are skipped. Keys hash the PNG's path
(``oc`` + 16 hex digits), so the corpus, its split and its captions are the same everywhere, and
``limit`` keeps a subset of the full corpus with the same captions and keys (and the same split,
but for the val drawing :func:`val_keys` gives a category the hash left without one).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplab.data.clipart_captions import (
    Caption,
    Collections,
    SvgMeta,
    caption_for,
    caption_stats,
    clean_title,
    read_svg_meta,
)
from cliplab.data.shards import Sample, deterministic_split, write_splits
from cliplab.errors import DataError

ROOT = Path("/usr/share/openclipart")
MIN_PER_CATEGORY = 20
#: zero-shot prompts (written to the eval set's templates.txt)
TEMPLATES: tuple[str, ...] = ("clip art of {}.", "a drawing of {}.", "an illustration of {}.",
                              "a clip art image from the {} category.")
#: category folders whose name reads badly as a class name
CLASS_NAMES = {"signs_and_symbols": "signs and symbols", "special": "patterns and gradients",
               "computer": "computers", "office": "office supplies"}
#: categories in the corpus but not in the zero-shot set: no visual class
EVAL_EXCLUDED = frozenset({"unsorted"})
_INSTALL = ("install Debian's openclipart-png and openclipart-svg (apt-get install openclipart-png "
            "openclipart-svg; `make setup` does it) or pass --source")


@dataclass(frozen=True)
class ClipArt:
    """One drawing: ``rel`` is the PNG's path under ``png/`` without ``.png``, POSIX style."""

    rel: str
    png: Path
    svg: Path
    meta: SvgMeta

    @property
    def key(self) -> str:
        return "oc" + hashlib.blake2b(self.rel.encode(), digest_size=8).hexdigest()

    @property
    def category(self) -> str:
        return self.rel.split("/", 1)[0]

    @property
    def stem(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


def class_name(category: str) -> str:
    """A category folder as a class name: ``signs_and_symbols`` → ``signs and symbols``."""
    return CLASS_NAMES.get(category, category.replace("_", " "))


# the scan -----------------------------------------------------------------------------------
def _png_paths(png_root: Path) -> list[Path]:
    paths = []
    for folder, dirs, files in os.walk(png_root):  # symlinked folders are not followed
        dirs.sort()
        paths += [Path(folder, f) for f in sorted(files) if f.lower().endswith(".png")]
    return paths


def _canonical(paths: list[Path], skipped: Counter) -> list[Path]:
    """One path per drawing: of the names resolving to one file, the real file (else the first
    name); the others count as ``duplicate``. Names directly under ``png/`` count as ``no_category``."""
    by_target: dict[Path, list[Path]] = {}
    for p in paths:
        by_target.setdefault(p.resolve(), []).append(p)
    keep = []
    for names in by_target.values():
        real = [p for p in names if not p.is_symlink()]
        keep.append((real or names)[0])
        skipped["duplicate"] += len(names) - 1
    return sorted(keep)


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` found: the drawings, the skip counts so far, the small categories left
    out (name → drawings) and the collections (found over every drawing, so a ``limit`` changes
    no caption)."""

    arts: list[ClipArt]
    skipped: Counter
    small_categories: dict[str, int]
    collections: Collections

    def caption(self, art: ClipArt) -> Caption:
        return caption_for(art.meta, art.stem, self.collections)


def scan(root: str | Path = ROOT, *, min_per_category: int = MIN_PER_CATEGORY, limit: int | None = None) -> Scan:
    """The drawings under ``root`` in path order. ``limit`` keeps that many, taken round-robin
    over the categories in key order (every category stays represented; the same drawings on
    every machine)."""
    root = Path(root)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir() or not svg_root.is_dir():
        raise DataError(f"Open Clip Art not found in {root} (no png/ and svg/ folders): {_INSTALL}")
    skipped: Counter = Counter()
    arts = []
    for p in _canonical(_png_paths(png_root), skipped):
        rel = p.relative_to(png_root).with_suffix("").as_posix()
        if "/" not in rel:
            skipped["no_category"] += 1
            continue
        svg = svg_root / f"{rel}.svg"
        arts.append(ClipArt(rel, p, svg, read_svg_meta(svg)))
    collections = Collections.of(a.meta for a in arts)
    sizes = Counter(a.category for a in arts)
    small = {c: n for c, n in sorted(sizes.items()) if n < min_per_category}
    skipped["small_category"] += sum(small.values())
    arts = [a for a in arts if a.category not in small]
    if limit:
        queues = [sorted((a for a in arts if a.category == c), key=lambda a: a.key) for c in sorted(sizes)]
        picked: list[ClipArt] = []
        while len(picked) < limit and any(queues):
            for q in queues:
                if q and len(picked) < limit:
                    picked.append(q.pop(0))
        arts = sorted(picked, key=lambda a: a.rel)
    return Scan(arts, +skipped, small, collections)


def val_keys(arts: list[ClipArt], val_fraction: float, seed: int) -> set[str]:
    """The val split: :func:`deterministic_split` of the key, then a category the hash left
    without a val drawing gives its smallest key to val (when ``val_fraction`` > 0). Decided
    before any PNG is read, so the corpus and the eval set agree; a category whose only val
    drawings are skipped later (unreadable, repeated bytes) has none in the written val split."""
    keys = {a.key for a in arts if deterministic_split(a.key, val_fraction, seed) == "val"}
    if val_fraction > 0:
        for category in {a.category for a in arts}:
            mine = sorted(a.key for a in arts if a.category == category)
            if not keys & set(mine):
                keys.add(mine[0])
    return keys


# images and the builders --------------------------------------------------------------------
IMAGE_PX = 256


class _TooLarge(Exception):
    pass


def render_png(raw: bytes, image_px: int | None = IMAGE_PX) -> bytes:
    """A PNG file's bytes as an RGB PNG: transparency composited on white, the longer side at
    most ``image_px`` (None: as drawn). Raises on an undecodable file; :class:`_TooLarge` over
    :data:`cliplab.data.decode.MAX_IMAGE_PIXELS` (checked from the header, before decoding)."""
    from PIL import Image

    from cliplab.data.decode import MAX_IMAGE_PIXELS

    with Image.open(io.BytesIO(raw)) as im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise _TooLarge
        rgba = im.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, (0, 0), rgba)
    if image_px and max(canvas.size) > image_px:
        canvas.thumbnail((image_px, image_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    return buf.getvalue()


def _load(args: tuple[str, int | None]) -> tuple[bytes | None, str, str]:
    """(PNG bytes or None, skip reason or "", SHA-256 of the source file) for one drawing."""
    path, image_px = args
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None, "unreadable_png", ""
    digest = hashlib.sha256(raw).hexdigest()
    try:
        return render_png(raw, image_px), "", digest
    except _TooLarge:
        return None, "png_over_64_mpx", digest
    except Exception:  # noqa: BLE001 - any undecodable PNG is skipped and counted, never fatal
        return None, "unreadable_png", digest


def _rendered(arts: list[ClipArt], image_px: int | None, workers: int, progress: bool, skipped: Counter,
              desc: str) -> Iterator[tuple[ClipArt, bytes]]:
    """``(drawing, PNG bytes)`` in order, rendered by ``workers`` processes; unreadable, oversized
    and byte-identical repeats (``duplicate``) are counted in ``skipped`` instead."""
    from tqdm import tqdm

    seen: set[str] = set()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_load, [(str(a.png), image_px) for a in arts], chunksize=8)
        for art, (png, reason, digest) in tqdm(zip(arts, results, strict=True), total=len(arts), desc=desc,
                                               unit="img", disable=not progress):
            if digest and digest in seen and not reason:
                reason = "duplicate"
            seen.add(digest)
            if reason:
                skipped[reason] += 1
            else:
                yield art, png


def build_openclipart_corpus(out_dir: str | Path, *, root: str | Path = ROOT, image_px: int | None = IMAGE_PX,
                             val_fraction: float = 0.1, seed: int = 0, samples_per_shard: int = 500,
                             min_per_category: int = MIN_PER_CATEGORY, limit: int | None = None, workers: int = 2,
                             progress: bool = True) -> dict[str, Any]:
    """Write the corpus into ``out_dir/{train,val}/*.tar`` plus ``stats.json``; returns the stats.

    Each sample is ``{key}.png`` (RGB on white, longer side at most ``image_px``), ``{key}.txt``
    (the caption) and ``{key}.json`` (category, folder, title, keywords, source path,
    caption_source). The split is :func:`val_keys`. Skipped and counted: ``duplicate`` (a second
    name of a drawing, or the same bytes again), ``small_category``, ``no_category``,
    ``unreadable_png``, ``png_over_64_mpx``. ``stats.json`` adds the categories per split, the
    SVG metadata statuses and the caption sources and lengths.
    """
    found = scan(root, min_per_category=min_per_category, limit=limit)
    skipped = Counter(found.skipped)
    val = val_keys(found.arts, val_fraction, seed)
    extra: dict[str, Any] = {"source": f"Open Clip Art ({root})", "image_px": image_px,
                             "min_per_category": min_per_category, "small_categories": found.small_categories}

    def samples() -> Iterator[Sample]:
        kept: list[tuple[ClipArt, Caption]] = []
        for art, png in _rendered(found.arts, image_px, workers, progress, skipped, "rendering clip art"):
            caption = found.caption(art)
            kept.append((art, caption))
            yield Sample(art.key, png, "png", caption.text,
                         {"category": art.category, "folder": art.rel.rsplit("/", 1)[0],
                          "title": clean_title(art.meta.title), "keywords": list(art.meta.keywords),
                          "source": f"png/{art.rel}.png", "caption_source": caption.source})
        # write_splits reads extra_stats once every sample is written, i.e. after this point
        extra["categories"] = dict(sorted(Counter(a.category for a, _ in kept).items()))
        extra["categories_by_split"] = {
            split: dict(sorted(Counter(a.category for a, _ in kept if (a.key in val) == (split == "val")).items()))
            for split in ("train", "val")}
        extra["svg_metadata"] = dict(Counter(a.meta.status for a, _ in kept))
        extra["captions"] = caption_stats([c for _, c in kept])

    return write_splits(samples(), Path(out_dir), val_fraction=val_fraction, seed=seed,
                        samples_per_shard=samples_per_shard, skipped=skipped,
                        split_of=lambda s: "val" if s.key in val else "train", extra_stats=extra)


def build_openclipart_eval_set(out_dir: str | Path, *, root: str | Path = ROOT, image_px: int | None = IMAGE_PX,
                               split: str = "val", val_fraction: float = 0.1, seed: int = 0,
                               min_per_category: int = MIN_PER_CATEGORY, limit: int | None = None,
                               samples_per_shard: int = 500, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """A zero-shot classification set (:mod:`cliplab.data.evalsets` layout) whose classes are the
    corpus's categories but :data:`EVAL_EXCLUDED` (classnames in folder order, :func:`class_name`),
    with the :data:`TEMPLATES` prompts. ``split`` ("val", "train" or "all") picks drawings by
    :func:`val_keys` with the same ``val_fraction``/``seed``/``limit``/``min_per_category`` as the
    corpus, so the default set is exactly the corpus's val split minus excluded categories.
    ``{key}.json`` holds title, caption and category. Returns the stats."""
    from cliplab.data.evalsets import ClassSample, write_classification_set

    if split not in ("val", "train", "all"):
        raise DataError(f"openclipart eval split must be val, train or all, got {split!r}")
    found = scan(root, min_per_category=min_per_category, limit=limit)
    categories = sorted({a.category for a in found.arts} - EVAL_EXCLUDED)
    index = {c: i for i, c in enumerate(categories)}
    val = val_keys(found.arts, val_fraction, seed)
    chosen = [a for a in found.arts if split == "all" or (a.key in val) == (split == "val")]
    skipped = Counter({"excluded_category": sum(a.category not in index for a in chosen)})
    extra: dict[str, Any] = {"source": f"Open Clip Art ({root}), {split} split (val_fraction {val_fraction}, "
                                       f"seed {seed})", "image_px": image_px}

    def samples() -> Iterator[ClassSample]:
        arts = [a for a in chosen if a.category in index]
        for art, png in _rendered(arts, image_px, workers, progress, skipped, "rendering clip art eval set"):
            yield ClassSample(art.key, png, "png", index[art.category],
                              {"title": clean_title(art.meta.title), "caption": found.caption(art).text,
                               "category": art.category})
        extra["skipped"] = dict(+skipped)  # read by write_classification_set after the last sample

    return write_classification_set(samples(), out_dir, [class_name(c) for c in categories], TEMPLATES,
                                    samples_per_shard=samples_per_shard, extra_stats=extra)
