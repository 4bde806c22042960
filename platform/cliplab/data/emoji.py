"""The demo corpus: Noto Color Emoji rendered with Pillow, captioned by name, with a hierarchy.

Images come from Debian's ``fonts-noto-color-emoji``; names from the PyPI ``emoji`` package;
the group/subgroup hierarchy and the emoji list from Unicode's ``emoji-test.txt`` (Debian's
``unicode-data``). Skin-tone variants are skipped (near-duplicate images with near-duplicate
captions) and counted. Keys come from the codepoints, so the corpus is the same everywhere.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplab.data.shards import Sample, deterministic_split, write_splits
from cliplab.data.templates import EMOJI
from cliplab.errors import DataError

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_SIZE = 109  # the only bitmap size of this CBDT font
REFERENCE = "\U0001F600"  # grinning face: one full-size glyph in every version of the font
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E[\d.]+\s+(.+)$")


@dataclass(frozen=True)
class EmojiEntry:
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def char(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def key(self) -> str:
        return "u" + "_".join(f"{c:x}" for c in self.codepoints)


def read_emoji_test(path: Path = EMOJI_TEST) -> list[EmojiEntry]:
    """Fully-qualified emoji with their Unicode group and subgroup."""
    if not path.is_file():
        raise DataError(f"{path} not found: install Debian's unicode-data package "
                        "(apt-get install unicode-data; `make setup` does it)")
    entries, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif m := _LINE.match(line):
            cps = tuple(int(c, 16) for c in m.group(1).split())
            entries.append(EmojiEntry(cps, m.group(2).strip(), group, subgroup))
    return entries


def caption_for(entry: EmojiEntry) -> str:
    """The PyPI ``emoji`` package's English name (``:red_apple:`` → ``red apple``), else Unicode's."""
    import emoji

    data = emoji.EMOJI_DATA.get(entry.char)
    if data and data.get("en"):
        return data["en"].strip(":").replace("_", " ")
    return entry.name


def _render(args: tuple[str, int | None, str]) -> bytes | None:
    """PNG bytes of one emoji centred on a white square, or None when the font has no glyph for
    it: a blank render, or a sequence drawn as several glyphs (the font lacks its ligature).

    The square is at least one glyph cell wide, so small glyphs stay small (``black small
    square`` and ``black large square`` must not become the same image).
    """
    from PIL import Image, ImageDraw

    char, image_px, font_path = args
    font, cell = _font(font_path)
    if font.getlength(char) > 1.5 * font.getlength(REFERENCE):
        return None
    canvas = Image.new("RGBA", (2 * cell, 2 * cell), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((cell // 4, cell // 4), char, font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = max(*glyph.size, cell)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    if image_px:
        square = square.resize((image_px, image_px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    square.save(buf, "PNG", optimize=False)
    return buf.getvalue()


_FONTS: dict[str, Any] = {}


def _font(path: str) -> tuple[Any, int]:
    """The font (raqm layout: ZWJ, flag and keycap sequences become one glyph) and its cell size."""
    from PIL import ImageFont

    if path not in _FONTS:
        font = ImageFont.truetype(path, FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        left, top, right, bottom = font.getbbox(REFERENCE)
        _FONTS[path] = font, min(right - left, bottom - top)
    return _FONTS[path]


def _require_shaping() -> None:
    from PIL import features

    if not features.check("raqm"):
        raise DataError("Pillow's raqm text layout is unavailable, so emoji sequences (flags, families, "
                        "keycaps) cannot be drawn as one glyph: install the FriBiDi library "
                        "(apt-get install libfribidi0) and rerun")


def build_emoji_corpus(out_dir: str | Path, *, image_px: int | None = 128, val_fraction: float = 0.1,
                       seed: int = 0, samples_per_shard: int = 500, font_path: Path = FONT,
                       limit: int | None = None, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Render the corpus into ``out_dir/{train,val}/*.tar`` plus ``stats.json``; returns the stats.

    Each sample is ``{key}.png`` (``image_px`` square, or the glyph's own size when None),
    ``{key}.txt`` (the name) and ``{key}.json`` (key, caption, name, unicode_name, group,
    subgroup, codepoints). Keys come from the codepoints. The split is :func:`deterministic_split`
    of the key, then each group the hash left without a val sample gives its first key to val.
    ``limit`` keeps the first emoji in Unicode order (for tests); ``workers`` render processes.
    """
    from tqdm import tqdm

    if not Path(font_path).is_file():
        raise DataError(f"{font_path} not found: install Debian's fonts-noto-color-emoji "
                        "(apt-get install fonts-noto-color-emoji; `make setup` does it)")
    _require_shaping()
    skipped: Counter = Counter()
    entries = []
    for entry in read_emoji_test():
        if SKIN_TONES & set(entry.codepoints):
            skipped["skin_tone_variant"] += 1
        elif entry.group == "Component":
            skipped["component"] += 1
        else:
            entries.append(entry)
    entries = entries[:limit] if limit else entries
    notdef = _render(("\U000E0FFF", image_px, str(font_path)))  # an unassigned codepoint: the tofu glyph

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(tqdm(pool.map(_render, [(e.char, image_px, str(font_path)) for e in entries], chunksize=32),
                           total=len(entries), desc="rendering emoji", unit="img", disable=not progress))
    rendered = []
    for entry, png in zip(entries, images, strict=True):
        if png is None or png == notdef:
            skipped["not_in_font"] += 1
            continue
        rendered.append((entry, png))

    val_keys = {e.key for e, _ in rendered if deterministic_split(e.key, val_fraction, seed) == "val"}
    by_group: dict[str, list[str]] = {}
    for e, _ in rendered:
        by_group.setdefault(e.group, []).append(e.key)
    for keys in by_group.values():
        if not val_keys & set(keys):
            val_keys.add(sorted(keys)[0])

    samples = (Sample(e.key, png, "png", caption_for(e),
                      {"name": caption_for(e), "unicode_name": e.name, "group": e.group, "subgroup": e.subgroup,
                       "codepoints": [f"U+{c:04X}" for c in e.codepoints]})
               for e, png in rendered)
    groups = Counter(e.group for e, _ in rendered)
    by_split = {split: dict(sorted(Counter(e.group for e, _ in rendered if (e.key in val_keys) == (split == "val"))
                                   .items())) for split in ("train", "val")}
    return write_splits(samples, Path(out_dir), val_fraction=val_fraction, seed=seed,
                        samples_per_shard=samples_per_shard, skipped=skipped,
                        split_of=lambda s: "val" if s.key in val_keys else "train",
                        extra_stats={"source": "Noto Color Emoji", "groups": dict(sorted(groups.items())),
                                     "groups_by_split": by_split,
                                     "subgroups": len({e.subgroup for e, _ in rendered})})


# the zero-shot eval set (classes = emoji groups) and the hierarchy captions --------------------
_SUBGROUP_TEXT = {"food-fruit": "fruit", "food-vegetable": "vegetables", "food-prepared": "prepared food",
                  "food-asian": "asian food", "food-marine": "seafood", "food-sweet": "sweets",
                  "animal-marine": "marine animals", "animal-bug": "bugs", "plant-flower": "flowers",
                  "plant-other": "plants", "place-other": "places",
                  "place-geographic": "geographic places", "place-religious": "religious places", "other-object": "other objects",
                  "other-symbol": "other symbols", "av-symbol": "audio & video symbols"}


def group_class_name(group: str) -> str:
    """A Unicode emoji group as a class name: ``Food & Drink`` → ``food & drink``."""
    return group.lower()


def group_caption(group: str) -> str:
    """The caption of a group in the traversal pool: ``an emoji of food & drink``."""
    return f"an emoji of {group_class_name(group)}"


def subgroup_caption(subgroup: str) -> str:
    """The caption of a subgroup: ``food-fruit`` → ``an emoji of fruit``, ``face-smiling`` →
    ``an emoji of smiling face``, ``animal-mammal`` → ``an emoji of mammal``."""
    text = _SUBGROUP_TEXT.get(subgroup)
    if text is None:
        head, _, rest = subgroup.partition("-")
        if head == "face" and rest:
            text = f"{rest.replace('-', ' ')} face"
        elif head in ("animal", "place") and rest:
            text = rest.replace("-", " ")
        else:
            text = subgroup.replace("-", " ")
    return f"an emoji of {text}"


def _eval_entries(split: str, val_fraction: float, seed: int, limit: int | None) -> list[EmojiEntry]:
    """The emoji of ``split`` ("val", "train" or "all") by :func:`deterministic_split` of the key
    (so a corpus built with the same fraction and seed never trained on a "val" eval image),
    without skin-tone variants and components; ``limit`` takes that many round-robin over the
    groups (in Unicode order), so every group stays represented."""
    if split not in ("val", "train", "all"):
        raise DataError(f"emoji eval split must be val, train or all, got {split!r}")
    by_group: dict[str, list[EmojiEntry]] = {}
    for e in read_emoji_test():
        if SKIN_TONES & set(e.codepoints) or e.group == "Component":
            continue
        if split == "all" or deterministic_split(e.key, val_fraction, seed) == split:
            by_group.setdefault(e.group, []).append(e)
    if not limit:
        return [e for entries in by_group.values() for e in entries]
    out: list[EmojiEntry] = []
    queues = [list(v) for v in by_group.values()]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def build_emoji_eval_set(out_dir: str | Path, *, image_px: int | None = 128, split: str = "val",
                         val_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
                         samples_per_shard: int = 500, font_path: Path = FONT, workers: int = 2,
                         progress: bool = True) -> dict[str, Any]:
    """A zero-shot classification set of emoji (:mod:`cliplab.data.evalsets` layout): the class
    of an emoji is its Unicode group (``smileys & emotion``, ``food & drink``, …; classnames in
    Unicode order), the images are rendered as in :func:`build_emoji_corpus`, and the prompts are
    :data:`cliplab.data.templates.EMOJI`. ``split``/``val_fraction``/``seed`` pick the emoji
    (default: the corpus's val split); ``limit`` keeps that many, spread over the groups.
    ``{key}.json`` holds name, group and subgroup. Returns the stats."""
    from tqdm import tqdm

    from cliplab.data.evalsets import ClassSample, write_classification_set

    if not Path(font_path).is_file():
        raise DataError(f"{font_path} not found: install Debian's fonts-noto-color-emoji "
                        "(apt-get install fonts-noto-color-emoji; `make setup` does it)")
    _require_shaping()
    entries = _eval_entries(split, val_fraction, seed, limit)
    groups = list(dict.fromkeys(e.group for e in read_emoji_test() if e.group != "Component"))
    index = {g: i for i, g in enumerate(groups)}
    notdef = _render(("\U000E0FFF", image_px, str(font_path)))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(tqdm(pool.map(_render, [(e.char, image_px, str(font_path)) for e in entries], chunksize=16),
                           total=len(entries), desc="rendering emoji eval set", unit="img", disable=not progress))
    skipped: Counter = Counter()
    samples = []
    for e, png in zip(entries, images, strict=True):
        if png is None or png == notdef:
            skipped["not_in_font"] += 1
            continue
        samples.append(ClassSample(e.key, png, "png", index[e.group],
                                   {"name": caption_for(e), "group": e.group, "subgroup": e.subgroup}))
    return write_classification_set(samples, out_dir, [group_class_name(g) for g in groups], EMOJI,
                                    samples_per_shard=samples_per_shard,
                                    extra_stats={"source": f"Noto Color Emoji, {split} split "
                                                           f"(val_fraction {val_fraction}, seed {seed})",
                                                 "skipped": dict(skipped)})
