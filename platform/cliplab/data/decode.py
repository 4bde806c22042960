"""The one sample decoder: tar members → samples, or a skip reason.

Training (:mod:`cliplab.data.index` and :mod:`cliplab.data.stream`), val
(:mod:`cliplab.data.pipeline`), ``cliplab eval`` (:mod:`cliplab.eval.sets`) and ``cliplab data
inspect`` all read shards through here, so they share one key rule (:func:`split_name`), one
:data:`IMAGE_EXTS`, one set of skip reasons and one size guard:

* :func:`iter_groups` streams a tar and groups its members by key. A member whose declared size
  (``TarInfo.size``: for a GNU-sparse member the real, expanded size) is over its cap
  (:class:`Limits`) is never read: its sample is skipped as ``oversized_member``. Long-name and
  pax headers over :data:`MAX_HEADER_BYTES` stop the shard before tarfile reads them.
* :func:`check_group` gives a group's structural skip reason (no image decode).
* :func:`decode_sample` turns a group into a :class:`Sample` (RGB image, caption, label) or a
  :class:`Skip`.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_HEADER_BYTES = 1 << 20  # long-name / pax header members
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are decompression bombs (PIL's default is 89M)
SHARD_REASONS = ("unreadable_shard", "truncated_tar")
GROUP_REASONS = ("oversized_member", "empty_file", "missing_image", "missing_caption", "non_utf8_caption",
                 "empty_caption")
IMAGE_REASONS = ("corrupt_image", "truncated_image", "decompression_bomb")
LABEL_REASON = "missing_or_bad_cls"  # classification eval sets: no readable {key}.cls


@dataclass(frozen=True)
class Limits:
    """Per-member size caps in bytes: image members, and every other member (txt, json, cls)."""

    image_bytes: int = 64 << 20
    text_bytes: int = 1 << 20

    def cap(self, ext: str) -> int:
        return self.image_bytes if ext in IMAGE_EXTS else self.text_bytes

    @classmethod
    def of(cls, data_cfg) -> Limits:
        """The caps of a :class:`~cliplab.config.DataConfig` (``max_image_bytes``, ``max_text_bytes``)."""
        return cls(int(data_cfg.max_image_bytes), int(data_cfg.max_text_bytes))


def split_name(name: str) -> tuple[str, str]:
    """webdataset's grouping: ``dir/abc.seg.jpg`` → (``dir/abc``, ``seg.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class OversizedHeader(tarfile.ReadError):
    """A long-name or pax header member larger than :data:`MAX_HEADER_BYTES`."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads long-name and pax header members whole, before any caller sees them: refuse
    a large one instead."""

    def _proc_member(self, tarfile_):
        headers = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)
        if self.type in headers and self.size > MAX_HEADER_BYTES:
            raise OversizedHeader(f"a header member of {self.size} bytes (over {MAX_HEADER_BYTES})")
        return super()._proc_member(tarfile_)


class ShardFault(Exception):
    """A tar that cannot be read on: ``reason`` is ``unreadable_shard`` (nothing readable),
    ``truncated_tar`` (cut off) or ``oversized_member`` (a huge header; the rest is skipped)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Group:
    """One sample's members: bytes of those read, declared sizes of all, and the byte range
    ``[start, end)`` they span in the tar (headers included)."""

    key: str
    start: int
    end: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    oversized: str = ""  # the first member over its cap, as "ext: N bytes, cap M"


def iter_groups(fileobj, limits: Limits, *, size: int | None = None, end_marker: bool = True,
                read: Callable[[str], bool] = lambda ext: True) -> Iterator[Group]:
    """The member groups of a tar stream, in order. Members are read (``read(ext)``) only when
    under their cap. ``size`` (the file's length) adds two checks: no member may end past it,
    and (with ``end_marker``) the archive must end with its end marker. Raises
    :class:`ShardFault`; a group that is already oversized is yielded before the fault (its skip
    does not depend on the rest)."""
    group: Group | None = None
    members = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                members += 1
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if group is None or key != group.key:
                    if group is not None:
                        yield group
                    group = Group(key, member.offset)
                _add_member(group, tar, member, ext, limits, read, size)
            if group is not None and size is not None and end_marker and group.end + 1024 > size:
                raise tarfile.ReadError("no end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError) as err:
        if group is not None and group.oversized:
            yield group
        reason = "oversized_member" if isinstance(err, OversizedHeader) else \
            "truncated_tar" if members else "unreadable_shard"
        raise ShardFault(reason, str(err) or type(err).__name__) from None
    if group is not None:
        yield group


def _add_member(group: Group, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, limits: Limits,
                read: Callable[[str], bool], size: int | None) -> None:
    """Record ``member`` in ``group``; its bytes only when it is under its cap and ends in the file."""
    group.end = tar.offset  # after this member's data blocks (for a sparse member: the stored ones)
    group.sizes[ext] = member.size  # for a sparse member: the expanded size
    if member.size > limits.cap(ext):
        group.oversized = group.oversized or f"{ext}: {member.size} bytes, cap {limits.cap(ext)}"
    if size is not None and group.end > size:
        raise tarfile.ReadError(f"{member.name} declares {member.size} bytes, past the end of the file")
    if not group.oversized and read(ext):
        group.files[ext] = tar.extractfile(member).read()


def shard_groups(filesystem, path: str, limits: Limits, *,
                 read: Callable[[str], bool] = lambda ext: True) -> Iterator[Group]:
    """:func:`iter_groups` over one shard of a pyarrow ``filesystem`` (local or S3). Raises
    :class:`ShardFault` (a shard that cannot even be opened is ``unreadable_shard``)."""
    try:
        size = filesystem.get_file_info(path).size
        raw = filesystem.open_input_stream(path)
    except OSError as err:
        raise ShardFault("unreadable_shard", str(err)) from None
    with raw:
        yield from iter_groups(raw, limits, size=size, read=read)


def parse_sample(fragment: bytes, limits: Limits) -> Group:
    """The first group of a byte range that holds one sample's members (from the index)."""
    for group in iter_groups(io.BytesIO(fragment), limits, size=len(fragment), end_marker=False):
        return group
    raise ShardFault("truncated_tar", "no tar member in the byte range")


# -- one group → one sample ---------------------------------------------------------------------

class Skip(NamedTuple):
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return self.reason.replace("_", " ") + (f" ({self.detail})" if self.detail else "")


@dataclass
class Sample:
    """A decoded sample: the RGB image, its caption (retrieval/training) and its label (the
    JSON's ``label_key`` field, or the ``.cls`` text of a classification set)."""

    key: str
    image: Any  # PIL.Image.Image, mode RGB
    caption: str | None
    label: str
    meta: dict
    format: str  # the image's PIL format, lower case
    size: tuple[int, int]  # the decoded image's size


def caption_of(files: dict[str, bytes]) -> str | Skip:
    """The stripped UTF-8 caption, or the reason it is unusable."""
    if "txt" not in files:
        return Skip("missing_caption")
    try:
        text = files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        return Skip("non_utf8_caption", str(err))
    return text or Skip("empty_caption")


def check_group(group: Group, *, kind: str = "caption") -> str | None:
    """The structural skip reason of a group (no image decode), or None. ``kind="cls"``: a
    classification sample, which needs a ``.cls`` member instead of a caption."""
    if group.oversized:
        return "oversized_member"
    if any(n == 0 for n in group.sizes.values()):
        return "empty_file"
    if not any(e in group.sizes for e in IMAGE_EXTS):
        return "missing_image"
    if kind == "cls":
        return None if _class_index(group.files) is not None else LABEL_REASON
    caption = caption_of(group.files)
    return caption.reason if isinstance(caption, Skip) else None


def _class_index(files: dict[str, bytes]) -> int | None:
    try:
        return int(files["cls"].decode("utf-8").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _meta(files: dict[str, bytes]) -> dict:
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_sample(group: Group, *, kind: str = "caption", label_key: str | None = None,
                  draft: int | None = None) -> Sample | Skip:
    """One group as a :class:`Sample`, or a :class:`Skip` with one of :data:`GROUP_REASONS`,
    :data:`IMAGE_REASONS` (or :data:`LABEL_REASON` for ``kind="cls"``). ``draft``: see :func:`load_rgb`."""
    reason = check_group(group, kind=kind)
    if reason:
        return Skip(reason, group.oversized)
    raw = next(group.files[e] for e in IMAGE_EXTS if e in group.files)
    rgb, problem = load_rgb(raw, draft=draft)
    if rgb is None:
        return Skip(*problem)
    meta = _meta(group.files)
    if kind == "cls":
        caption, label = None, str(_class_index(group.files))
    else:
        caption, label = caption_of(group.files), str(meta.get(label_key, "")) if label_key else ""
    return Sample(group.key, rgb, caption, label, meta, rgb.info.get("cliplab_format", ""), rgb.size)


def to_rgb(im):
    """``im`` as RGB. A palette image with transparency goes through RGBA first, so PIL never
    warns "Palette images with Transparency expressed in bytes should be converted to RGBA"."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(raw: bytes, draft: int | None = None):
    """Decode ``raw`` to an RGB PIL image: ``(image, None)`` or ``(None, (reason, detail))`` with
    reason ``decompression_bomb`` (over :data:`MAX_IMAGE_PIXELS`), ``truncated_image`` or
    ``corrupt_image``. ``draft`` lets JPEG decode at a reduced scale that is still at least
    ``draft`` pixels on each side (much cheaper for large photos). The source format is kept in
    ``image.info["cliplab_format"]``."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                    im.draft("RGB", (draft, draft))
                rgb = to_rgb(im)
                rgb.info["cliplab_format"] = (im.format or "").lower()
                return rgb, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, ("decompression_bomb", str(err))
    except Exception as err:  # noqa: BLE001 - any undecodable image is skipped, never fatal
        text = str(err) or type(err).__name__
        return None, ("truncated_image" if "truncated" in text.lower() else "corrupt_image", text)
