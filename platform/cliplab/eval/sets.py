"""``cliplab eval``'s eval sets: a ``--data`` folder (local or ``s3://``) opened as a zero-shot
classification set (``classnames.txt`` beside or above the tars, its prompts from
``templates.txt``) or a retrieval set in the training layout, and its samples read by the shared
decoder (:mod:`cliplab.data.decode`)."""

from __future__ import annotations

import logging
import posixpath
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cliplab.errors import DataError

log = logging.getLogger(__name__)

SPLIT_DIRS = ("test", "val", "validation", "train")


@dataclass
class EvalSet:
    """One ``--data``: its shards and, for a classification set, its classes and prompts."""

    url: str
    name: str
    kind: str  # classification | retrieval
    shards: Any  # cliplab.data.sources.ShardSet
    classnames: list[str] | None = None
    templates: list[str] | None = None
    templates_source: str = ""


def _read_text(filesystem, path: str) -> str | None:
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None


def _set_name(folder: str) -> str:
    base = posixpath.basename(folder.rstrip("/")) or "data"
    if base in SPLIT_DIRS:
        parent = posixpath.basename(posixpath.dirname(folder.rstrip("/")))
        base = f"{parent}-{base}" if parent else base
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def open_eval_set(url: str, s3cfg=None, *, templates: str | None = None) -> EvalSet:
    """Resolve ``url`` (local or ``s3://``; a folder of tars, or a folder holding ``test/`` or
    ``val/`` with them) and detect its kind: ``classnames.txt`` beside the tars or one folder up
    (CLIP_benchmark) makes it a zero-shot classification set, whose prompts come from
    ``templates.txt`` / ``zeroshot_classification_templates.txt`` there, else the OpenAI 80;
    otherwise it is a retrieval set in the training layout. ``templates`` (a name or a file,
    :func:`cliplab.data.templates.resolve_templates`) overrides the set's own prompts."""
    from cliplab.config import S3Config
    from cliplab.data.evalsets import CLASSNAMES, TEMPLATES, read_classnames
    from cliplab.data.sources import resolve_shards
    from cliplab.data.templates import OPENAI_IMAGENET, parse_templates, resolve_templates

    s3cfg = s3cfg or S3Config()
    try:
        shards = resolve_shards(url, s3cfg)
    except DataError as first:
        for sub in ("test", "val"):
            try:
                shards = resolve_shards(url.rstrip("/") + f"/{sub}/", s3cfg)
                break
            except DataError:
                continue
        else:
            raise DataError(f"--data {url}: {first}; point --data at a folder of .tar shards (a classification "
                            "set with classnames.txt, e.g. from `cliplab data fashion-mnist`, or training "
                            "shards such as OUT/val)") from None
    folder = posixpath.dirname(shards.paths[0])
    name = _set_name(folder)
    for where in (folder, posixpath.dirname(folder)):
        text = _read_text(shards.filesystem, posixpath.join(where, CLASSNAMES))
        if text is None:
            continue
        classnames = read_classnames(text, f"{url} {CLASSNAMES}")
        if templates:
            chosen, source = resolve_templates(templates), templates
        else:
            chosen, source = list(OPENAI_IMAGENET), "openai (the set has no templates.txt)"
            for tname in TEMPLATES:
                body = _read_text(shards.filesystem, posixpath.join(where, tname))
                if body is not None:
                    chosen, source = parse_templates(body, f"{url} {tname}"), tname
                    break
        return EvalSet(url, name, "classification", shards, classnames, chosen, source)
    return EvalSet(url, name, "retrieval", shards)


def iter_shard(path: str, filesystem) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one tar as ``(key, {ext: bytes})`` in tar order, read by the shared decoder
    (:mod:`cliplab.data.decode`: its key rule and member caps). For tools and tests; a shard that
    cannot be read on is a :class:`DataError`."""
    from cliplab.data.decode import Limits, ShardFault, shard_groups

    try:
        for group in shard_groups(filesystem, path, Limits()):
            yield group.key, group.files
    except ShardFault as fault:
        raise DataError(f"{path}: {fault.reason.replace('_', ' ')} ({fault.detail})") from None


def piece_samples(path: str, filesystem, kind: str, part: int, parts: int, limits, skipped: Counter) -> Iterator:
    """The samples ``i % parts == part`` of one shard, decoded by
    :func:`cliplab.data.decode.decode_sample` (the decoder of training and val: same key rule,
    caps and skip reasons); skips are counted into ``skipped`` (a shard fault by part 0 only)."""
    from cliplab.data.decode import ShardFault, Skip, decode_sample, shard_groups

    try:
        for i, group in enumerate(shard_groups(filesystem, path, limits)):
            if i % parts != part:
                continue
            sample = decode_sample(group, kind="cls" if kind == "classification" else "caption")
            if isinstance(sample, Skip):
                log.warning("skipping %s:%s: %s", path, group.key, sample)
                skipped[sample.reason] += 1
            else:
                yield sample
    except ShardFault as fault:
        if part == 0:
            log.warning("eval shard %s: %s (%s); the rest is skipped", path, fault.reason.replace("_", " "),
                        fault.detail)
            skipped[fault.reason] += 1


def make_names_unique(sets: Sequence[EvalSet]) -> None:
    """Suffix repeated set names (``-2``, ``-3``, …) so each set's metrics get their own names."""
    seen: Counter = Counter()
    for s in sets:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name}-{seen[s.name]}"
