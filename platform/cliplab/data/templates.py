"""Prompt templates for zero-shot classification: data shipped with cliplab.

``{}`` is replaced by the class name. ``OPENAI_IMAGENET`` is the 80-prompt list CLIP used for
ImageNet (Radford et al. 2021, the ``notebooks/Prompt_Engineering_for_ImageNet`` list);
``SIMPLE`` is the 7-prompt subset open_clip calls ``SIMPLE_IMAGENET_TEMPLATES``. A dataset may
bring its own ``templates.txt`` (one template per line, ``#`` comments and blank lines ignored).
"""

from __future__ import annotations

from pathlib import Path

from cliplab.errors import ConfigError, DataError

OPENAI_IMAGENET: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: the emoji eval set's own prompts (written to its templates.txt)
EMOJI: tuple[str, ...] = (
    "an emoji of {}.",
    "an emoji from the {} category.",
    "a {} emoji.",
    "an icon of {}.",
)

#: Fashion-MNIST's own prompts (written to its templates.txt): small grayscale product photos
FASHION: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale photo of the {}, a type of clothing.",
    "a small photo of a {}.",
)

NAMED: dict[str, tuple[str, ...]] = {"openai": OPENAI_IMAGENET, "simple": SIMPLE, "emoji": EMOJI,
                                     "fashion": FASHION}


def check_templates(templates: list[str] | tuple[str, ...], source: str) -> list[str]:
    """Every template must hold exactly one ``{}``; raises :class:`DataError` naming ``source``."""
    out = [t for t in templates]
    if not out:
        raise DataError(f"{source}: no prompt templates; write one per line, each with a {{}} for the class name")
    for t in out:
        if t.count("{}") != 1:
            raise DataError(f"{source}: template {t!r} must contain exactly one {{}} (the class name)")
    return out


def parse_templates(text: str, source: str = "templates.txt") -> list[str]:
    """Templates from a ``templates.txt`` body: one per line, blank lines and ``#`` comments skipped."""
    lines = [line.strip() for line in text.splitlines()]
    return check_templates([line for line in lines if line and not line.startswith("#")], source)


def resolve_templates(spec: str) -> list[str]:
    """``openai`` | ``simple`` | ``emoji`` | ``fashion`` | a path to a templates file."""
    if spec in NAMED:
        return list(NAMED[spec])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--templates {spec!r} is neither one of {', '.join(NAMED)} nor a file of templates")
    return parse_templates(path.read_text(encoding="utf-8"), str(path))
