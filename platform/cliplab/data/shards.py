"""The shard format: webdataset tars in img2dataset layout, and builders that write it.

Each sample is ``{key}.{jpg|png|webp}`` (original bytes), ``{key}.txt`` (UTF-8 caption) and
``{key}.json`` (metadata: at least ``key`` and ``caption``). Splits live in ``OUT/{split}/``
as ``{split}-000000.tar, ...``; ``OUT/stats.json`` holds counts per split and skip reasons.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.data.decode import IMAGE_EXTS, Limits, iter_groups, to_rgb
from cliplab.errors import DataError

IMAGE_SUFFIXES = {f".{e}" for e in IMAGE_EXTS}  # source files read by build_from_folder


@dataclass
class Sample:
    """One image-text pair as stored in a shard; ``meta`` goes into ``{key}.json`` beside key and caption."""

    key: str
    image: bytes
    ext: str  # jpg | png | webp
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def deterministic_split(key: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` for a stable ``val_fraction`` of keys, else ``"train"`` (same on every machine)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


class ShardSink:
    """Writes samples into ``{prefix}-{000000..}.tar`` files of at most ``samples_per_shard``.

    Shards left in ``out_dir`` under the same prefix by an earlier build are removed first, so a
    directory of shards never mixes two builds. Tar members get a fixed mtime and mode: the same
    samples give byte-identical shards.
    """

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.out_dir, self.prefix, self.per_shard = Path(out_dir), prefix, samples_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
        for old in self.out_dir.iterdir():
            if stale.fullmatch(old.name):
                old.unlink()
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None

    def write(self, sample: Sample) -> None:
        if self._tar is None or self.count % self.per_shard == 0:
            self._open_next()
        meta = {"key": sample.key, "caption": sample.caption, **sample.meta}
        for ext, data in ((sample.ext, sample.image), ("txt", sample.caption.encode("utf-8")),
                          ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))):
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def info(self) -> dict[str, Any]:
        """``{"samples": n, "shards": [file names]}``, as ``stats.json`` lists a split."""
        return {"samples": self.count, "shards": list(self.shards)}

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_split(samples: Iterable[Sample], out_dir: str | Path, split: str,
                samples_per_shard: int = 1000) -> dict[str, Any]:
    """Write all ``samples`` to ``out_dir/{split}/{split}-000000.tar, ...``; returns the split's info."""
    with ShardSink(Path(out_dir) / split, split, samples_per_shard) as sink:
        for sample in samples:
            sink.write(sample)
    return sink.info()


def write_splits(samples: Iterable[Sample], out_dir: Path, *, val_fraction: float, seed: int,
                 samples_per_shard: int, split_of=None, extra_stats: dict | None = None,
                 skipped: Counter | None = None) -> dict[str, Any]:
    """Route samples to ``train``/``val`` sinks and write ``stats.json``. Returns the stats.

    ``split_of(sample)`` picks the split (default: :func:`deterministic_split` of the key);
    ``skipped`` (reason -> count) may still grow while ``samples`` is consumed; ``extra_stats``
    is merged into the stats. Raises :class:`DataError` when no sample was written.
    """
    out_dir = Path(out_dir)
    (out_dir / "stats.json").unlink(missing_ok=True)  # a failed rebuild must not look complete
    split_of = split_of or (lambda s: deterministic_split(s.key, val_fraction, seed))
    sinks = {name: ShardSink(out_dir / name, name, samples_per_shard) for name in ("train", "val")}
    formats: Counter = Counter()
    try:
        for sample in samples:
            sinks[split_of(sample)].write(sample)
            formats[sample.ext] += 1
    finally:
        for sink in sinks.values():
            sink.close()
    total = sum(s.count for s in sinks.values())
    if total == 0:
        raise DataError(f"no usable samples to write into {out_dir} (skipped: {dict(skipped or {})})")
    stats = {
        "samples": total,
        "splits": {name: sink.info() for name, sink in sinks.items()},
        "image_formats": dict(formats),
        "skipped": dict(skipped or {}),
        "val_fraction": val_fraction,
        "seed": seed,
        **(extra_stats or {}),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def read_shard_samples(path: str | Path) -> Iterator[Sample]:
    """Read one tar back as samples, grouped by the shared decoder (:mod:`cliplab.data.decode`:
    its key rule and member caps). For tools and tests."""
    with open(path, "rb") as f:
        groups = {g.key: g.files for g in iter_groups(f, Limits(), size=Path(path).stat().st_size)}
    for key, files in groups.items():
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        yield Sample(key=key, image=files.get(ext, b""), ext=ext or "",
                     caption=files.get("txt", b"").decode("utf-8", "replace"),
                     meta=json.loads(files["json"]) if "json" in files else {})


# ------------------------------------------------------------------------------------------
# building from user data
#
# A source is a list of (image path, caption, source name) triples. The caption is None when
# missing, bytes when its encoding is still unchecked; the source name (the path relative to the
# folder, or as the table writes it) decides the split, so adding files later never moves a
# sample from one split to the other.

_Pair = tuple[Path, "str | bytes | None", str]


def _check_pair(key: str, pair: _Pair) -> tuple[Sample | None, str | None]:
    """Load and verify one image+caption pair. Returns (sample, None) or (None, skip reason)."""
    from PIL import Image

    image_path, caption, source = pair
    if caption is None:
        return None, "missing_caption"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    caption = caption.strip()
    if not caption:
        return None, "empty_caption"
    if not image_path.is_file():
        return None, "missing_image"
    data = image_path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: catches truncated files that verify() lets through
            fmt, (width, height) = (im.format or "").lower(), im.size
    except Exception:
        return None, "corrupt_image"
    if width < 1 or height < 1:
        return None, "corrupt_image"
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if ext is None:  # GIF, BMP, TIFF...: re-encoded as PNG so every webdataset reader decodes them
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            to_rgb(im).save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return Sample(key, data, ext, caption, {"source": source, "width": width, "height": height}), None


def _pairs_from_folder(src: Path) -> list[_Pair]:
    pairs = []
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = image.with_suffix(".txt")
        pairs.append((image, txt.read_bytes() if txt.is_file() else None, image.relative_to(src).as_posix()))
    return pairs


def sniff_separator(src: Path) -> str:
    """Tab or comma, whichever the table's header line is split by (``csv.Sniffer`` restricted to
    the two: open_clip_train's CSVs are tab-separated by default, spreadsheets write commas)."""
    import csv

    with src.open(newline="", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    try:
        return csv.Sniffer().sniff(header, delimiters="\t,").delimiter
    except csv.Error:
        raise DataError(f"{src}: cannot tell whether it is tab- or comma-separated from its header line; "
                        "pass --separator") from None


def _pairs_from_table(src: Path, image_col: str, caption_col: str, separator: str | None = None) -> list[_Pair]:
    import pandas as pd

    if src.suffix == ".parquet":
        table = pd.read_parquet(src)
    else:  # strings as written: a caption "NA" or "2024" stays text; only empty cells are missing
        table = pd.read_csv(src, sep=separator or sniff_separator(src), dtype=str, keep_default_na=False,
                            na_values=[""])
    for col in (image_col, caption_col):
        if col not in table.columns:
            raise DataError(f"{src}: no column '{col}' (columns: {', '.join(map(str, table.columns))})")
    pairs = []
    for image, caption in zip(table[image_col], table[caption_col], strict=True):
        if not isinstance(caption, bytes):  # bytes: Parquet binary, decoded (or rejected) later
            caption = None if caption is None or pd.isna(caption) else str(caption)
        path = Path(str(image))
        pairs.append((path if path.is_absolute() else src.parent / path, caption, str(image)))
    return pairs


def _build(pairs: list[_Pair], out_dir: str | Path, source: Path, *, val_fraction: float, seed: int,
           samples_per_shard: int, workers: int, progress: bool) -> dict[str, Any]:
    """Verify ``pairs`` on a thread pool (in order, a bounded window at a time) and write the shards."""
    from tqdm import tqdm

    skipped: Counter = Counter()
    window = max(1, workers) * 64

    def check(item: tuple[int, _Pair]) -> tuple[Sample | None, str | None]:
        return _check_pair(f"{item[0]:09d}", item[1])  # img2dataset-style 9-digit key

    def samples() -> Iterator[Sample]:
        items = iter(enumerate(pairs))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                tqdm(total=len(pairs), desc="building shards", unit="img", disable=not progress) as bar:
            while chunk := list(itertools.islice(items, window)):
                for sample, reason in pool.map(check, chunk):
                    bar.update()
                    if reason:
                        skipped[reason] += 1
                    else:
                        yield sample

    return write_splits(samples(), Path(out_dir), val_fraction=val_fraction, seed=seed,
                        samples_per_shard=samples_per_shard, skipped=skipped,
                        split_of=lambda s: deterministic_split(s.meta["source"], val_fraction, seed),
                        extra_stats={"source": str(source)})


def build_from_folder(src_dir: str | Path, out_dir: str | Path, *, val_fraction: float = 0.05, seed: int = 0,
                      samples_per_shard: int = 1000, workers: int = 4, progress: bool = True) -> dict[str, Any]:
    """Shards from ``name.{jpg,jpeg,png,webp}`` + ``name.txt`` pairs anywhere under ``src_dir``.

    Images keep their original bytes; each is fully decoded first. Bad pairs are skipped and
    counted by reason (``missing_caption``, ``empty_caption``, ``non_utf8_caption``,
    ``corrupt_image``) in ``stats.json``. The split hashes the image's path relative to
    ``src_dir``. Returns the stats; raises :class:`DataError` if ``src_dir`` is missing or
    yields no sample.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"source not found: {src} (expected a folder of image + .txt caption files)")
    return _build(_pairs_from_folder(src), out_dir, src, val_fraction=val_fraction, seed=seed,
                  samples_per_shard=samples_per_shard, workers=workers, progress=progress)


def build_from_table(path: str | Path, out_dir: str | Path, *, image_col: str = "image",
                     caption_col: str = "caption", separator: str | None = None, val_fraction: float = 0.05,
                     seed: int = 0, samples_per_shard: int = 1000, workers: int = 4,
                     progress: bool = True) -> dict[str, Any]:
    """Shards from a ``.csv``/``.tsv`` or ``.parquet`` table of (image path, caption) rows.

    ``separator`` None sniffs tab or comma from the header (:func:`sniff_separator`). Relative
    image paths are relative to the table's folder. Skip reasons are those of
    :func:`build_from_folder` plus ``missing_image``; the split hashes the path as written.
    """
    src = Path(path)
    if not src.is_file():
        raise DataError(f"source not found: {src} (expected a .csv, .tsv or .parquet table)")
    if src.suffix not in (".csv", ".tsv", ".parquet"):
        raise DataError(f"{src}: expected a .csv, .tsv or .parquet file")
    return _build(_pairs_from_table(src, image_col, caption_col, separator), out_dir, src,
                  val_fraction=val_fraction, seed=seed, samples_per_shard=samples_per_shard, workers=workers,
                  progress=progress)


def build_shards(src: str | Path, out_dir: str | Path, *, image_col: str = "image", caption_col: str = "caption",
                 separator: str | None = None, **options: Any) -> dict[str, Any]:
    """:func:`build_from_folder` for a folder, :func:`build_from_table` for a ``.csv``/``.tsv``/``.parquet``."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"source not found: {src}")
    if src.is_dir():
        return build_from_folder(src, out_dir, **options)
    return build_from_table(src, out_dir, image_col=image_col, caption_col=caption_col, separator=separator,
                            **options)
