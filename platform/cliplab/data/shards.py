"""The shard format: webdataset tars in img2dataset layout, and builders that write it.

Each sample is ``{key}.{jpg|png|webp}`` (original bytes), ``{key}.txt`` (UTF-8 caption) and
``{key}.json`` (metadata: at least ``key`` and ``caption``). Splits live in ``OUT/{split}/``
as ``{split}-000000.tar, ...``; ``OUT/stats.json`` holds counts per split and skip reasons.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliplab.errors import DataError

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Sample:
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
    """Writes samples into ``{prefix}-{000000..}.tar`` files of at most ``samples_per_shard``."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int = 1000) -> None:
        self.out_dir, self.prefix, self.per_shard = Path(out_dir), prefix, samples_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
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

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_splits(samples: Iterable[Sample], out_dir: Path, *, val_fraction: float, seed: int,
                 samples_per_shard: int, split_of=None, extra_stats: dict | None = None,
                 skipped: Counter | None = None) -> dict[str, Any]:
    """Route samples to ``train``/``val`` sinks and write ``stats.json``. Returns the stats."""
    out_dir = Path(out_dir)
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
        "splits": {name: {"samples": s.count, "shards": s.shards} for name, s in sinks.items()},
        "image_formats": dict(formats),
        "skipped": dict(skipped or {}),
        "val_fraction": val_fraction,
        "seed": seed,
        **(extra_stats or {}),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def read_shard_samples(path: str | Path) -> Iterator[Sample]:
    """Read one tar back as samples (files grouped by key). For tools and tests."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, files in groups.items():
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        yield Sample(key=key, image=files.get(ext, b""), ext=ext or "",
                     caption=files.get("txt", b"").decode("utf-8", "replace"),
                     meta=json.loads(files["json"]) if "json" in files else {})


# ------------------------------------------------------------------------------------------
# building from user data


def _check_pair(key: str, image_path: Path, caption: str | bytes | None) -> tuple[Sample | None, str | None]:
    """Load and verify one image+caption pair. Returns (sample, None) or (None, skip reason)."""
    from PIL import Image

    if caption is None:
        return None, "missing_caption"
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    caption = str(caption).strip()
    if not caption:
        return None, "empty_caption"
    if not image_path.is_file():
        return None, "missing_image"
    data = image_path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = (im.format or "").lower()
    except Exception:
        return None, "corrupt_image"
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if ext is None:  # other formats are re-encoded as PNG so every reader can decode them
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
    return Sample(key, data, ext, caption, {"source": str(image_path)}), None


def _pairs_from_folder(src: Path) -> list[tuple[Path, str | bytes | None]]:
    pairs = []
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = image.with_suffix(".txt")
        pairs.append((image, txt.read_bytes() if txt.is_file() else None))
    return pairs


def _pairs_from_table(src: Path, image_col: str, caption_col: str) -> list[tuple[Path, str | None]]:
    import pandas as pd

    table = pd.read_parquet(src) if src.suffix == ".parquet" else pd.read_csv(src)
    for col in (image_col, caption_col):
        if col not in table.columns:
            raise DataError(f"{src}: no column '{col}' (columns: {', '.join(map(str, table.columns))})")
    pairs = []
    for image, caption in zip(table[image_col], table[caption_col], strict=True):
        path = Path(str(image))
        pairs.append((path if path.is_absolute() else src.parent / path,
                      None if pd.isna(caption) else str(caption)))
    return pairs


def build_shards(src: str | Path, out_dir: str | Path, *, image_col: str = "image", caption_col: str = "caption",
                 val_fraction: float = 0.05, seed: int = 0, samples_per_shard: int = 1000,
                 workers: int = 4, progress: bool = True) -> dict[str, Any]:
    """Shards from a folder of ``name.{jpg,png,webp}`` + ``name.txt``, or a CSV/Parquet of
    (image path, caption). Bad pairs are skipped and counted by reason in ``stats.json``."""
    from tqdm import tqdm

    src = Path(src)
    if not src.exists():
        raise DataError(f"source not found: {src}")
    if src.is_dir():
        pairs = _pairs_from_folder(src)
    elif src.suffix in (".csv", ".parquet"):
        pairs = _pairs_from_table(src, image_col, caption_col)
    else:
        raise DataError(f"{src}: expected a folder, a .csv or a .parquet file")
    skipped: Counter = Counter()

    def samples() -> Iterator[Sample]:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = pool.map(lambda ip: _check_pair(f"{ip[0]:09d}", ip[1][0], ip[1][1]), enumerate(pairs))
            for sample, reason in tqdm(jobs, total=len(pairs), desc="building shards", unit="img",
                                       disable=not progress):
                if reason:
                    skipped[reason] += 1
                else:
                    yield sample

    return write_splits(samples(), Path(out_dir), val_fraction=val_fraction, seed=seed,
                        samples_per_shard=samples_per_shard, skipped=skipped,
                        extra_stats={"source": str(src)})
