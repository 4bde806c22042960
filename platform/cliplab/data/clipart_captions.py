"""Captions for Open Clip Art drawings, from the Dublin Core metadata of their SVG files.

:func:`read_svg_meta` reads the metadata with a guarded XML parser; :func:`caption_for` turns it
into a caption (the rules are in :mod:`cliplab.data.openclipart`'s docstring).

Open Clip Art files keep their metadata in ``<metadata><rdf:RDF><cc:Work>``: ``dc:title``,
``dc:description`` and ``dc:subject/rdf:Bag/rdf:li`` keywords (``dc:title`` also names the
creator and publisher inside ``cc:Agent``; those are not the work's title). The parser is expat
without namespace processing (prefixes are matched by local name, so a file whose namespaces sit
on the root or use a default namespace reads the same), with every entity declaration refused
(no entity expansion, hence no "billion laughs"), no external DTD or entity ever fetched, and at
most ``max_bytes`` read. Parsing stops at the end of the first ``Work`` that has a title, so a
1.6 MB drawing costs its first few kilobytes. Problems never raise: they come back as a status.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_CAPTION_WORDS = 30  # the text tower reads 32 tokens
SHARED = 5  # a title or description on this many drawings names a collection, not a drawing
MAX_SVG_BYTES = 4 << 20  # the largest openclipart-svg file is 1.7 MB
_CHUNK = 64 << 10

#: :attr:`SvgMeta.status` values: ``ok``, ``missing`` (no SVG beside the PNG), ``broken`` (not
#: well-formed XML, or an encoding expat lacks), ``entities_refused`` (declares entities),
#: ``too_large`` (no title in the first ``max_bytes``), ``no_title`` (parsed, no title in it)
STATUSES = ("ok", "missing", "broken", "entities_refused", "too_large", "no_title")


@dataclass(frozen=True)
class SvgMeta:
    """What one SVG says about itself. ``title`` is the ``cc:Work``'s ``dc:title``, else the
    SVG's own top-level ``<title>``; all text is as written (whitespace collapsed)."""

    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    status: str = "ok"


class _Refused(Exception):
    """An entity declaration: refused, as defusedxml's ``forbid_entities`` does."""


class _Done(Exception):
    """The first titled ``Work`` has ended: nothing more to read."""


class _Reader:
    """expat handlers that collect the work's title, description and keywords by element path."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {"title": [], "description": [], "svg_title": [], "subject": []}
        self.keywords: list[list[str]] = []

    def start(self, name: str, _attrs) -> None:
        self.stack.append(name.rpartition(":")[2])
        if self.stack[-1] == "li" and self._in_work_subject():
            self.keywords.append([])

    def end(self, _name: str) -> None:
        local = self.stack.pop()
        if local == "Work" and self.title:
            raise _Done

    def data(self, text: str) -> None:
        s = self.stack
        if len(s) >= 2 and s[-2] == "Work" and s[-1] in ("title", "description", "subject"):
            self.text[s[-1]].append(text)
        elif s[-1:] == ["li"] and self._in_work_subject() and self.keywords:
            self.keywords[-1].append(text)
        elif s == ["svg", "title"]:
            self.text["svg_title"].append(text)

    def _in_work_subject(self) -> bool:
        return "subject" in self.stack and "Work" in self.stack

    def _joined(self, field: str) -> str:
        return " ".join("".join(self.text[field]).split())

    @property
    def title(self) -> str:
        return self._joined("title")

    def meta(self, status: str = "ok") -> SvgMeta:
        title = self.title or self._joined("svg_title")
        words = [" ".join("".join(k).split()) for k in self.keywords]
        words += [w.strip() for w in self._joined("subject").split(",")]  # a plain-text dc:subject
        keywords = tuple(dict.fromkeys(w for w in words if w))
        if not title and status == "ok":
            status = "no_title"
        return SvgMeta(title, self._joined("description"), keywords, status)


def read_svg_meta(path: str | Path | None, max_bytes: int = MAX_SVG_BYTES) -> SvgMeta:
    """The metadata of the SVG at ``path`` (None or absent: status ``missing``). A broken file,
    one declaring entities, or one without a title in its first ``max_bytes`` gives an empty
    :class:`SvgMeta` with that status (see :data:`STATUSES`); this never raises for bad input."""
    from xml.parsers import expat

    if path is None or not Path(path).is_file():
        return SvgMeta(status="missing")
    reader = _Reader()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def refuse(*_args) -> None:
        raise _Refused

    parser.EntityDeclHandler = parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler, parser.EndElementHandler = reader.start, reader.end
    parser.CharacterDataHandler = reader.data
    try:
        with open(path, "rb") as f:
            read = 0
            while chunk := f.read(min(_CHUNK, max_bytes - read)):
                read += len(chunk)
                parser.Parse(chunk, False)
            if f.read(1):
                return reader.meta() if reader.title else SvgMeta(status="too_large")
            parser.Parse(b"", True)
    except _Done:
        pass
    except _Refused:
        return SvgMeta(status="entities_refused")
    except (expat.ExpatError, ValueError, OSError):
        return SvgMeta(status="broken")
    return reader.meta()


# captions ---------------------------------------------------------------------------------
_BY = re.compile(r"^clip\s*art\s+by\s+[^-]+-\s*", re.IGNORECASE)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_URL_OR_MAIL = re.compile(r"https?://|www\.|\S@\S")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def clean_title(text: str) -> str:
    """``Clipart by Nicu Buculei - piggy_bank`` → ``piggy bank``: HTML entities undone (some
    files escape twice), underscores to spaces, whitespace collapsed."""
    text = html.unescape(html.unescape(text)).replace("_", " ")
    return " ".join(_BY.sub("", " ".join(text.split())).split())


def stem_phrase(stem: str) -> str:
    """A file name as words: ``BasseTemperature`` → ``Basse Temperature``, ``chemistry_flask_matthew__02``
    → ``chemistry flask matthew``: a trailing ``01``/``02r`` version number is dropped, a ``7`` or
    ``10`` (a card's rank, a step) is kept."""
    words = _CAMEL.sub(" ", stem).replace("_", " ").replace("-", " ").split()
    if len(words) > 1 and re.fullmatch(r"0\d[a-z]?|r", words[-1]):
        words.pop()
    return " ".join(words)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def first_sentence(description: str, title: str) -> str:
    """The description's first sentence when it adds to ``title``, else ``""``."""
    text = " ".join(html.unescape(html.unescape(description)).split())
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0].strip() if text else ""
    if len(sentence.split()) < 3 or _URL_OR_MAIL.search(sentence) or sentence.endswith(":"):
        return ""
    if " ".join(_words(sentence)) in " ".join(_words(title)) or _words(sentence) == _words(title):
        return ""
    return sentence


def _norm(text: str) -> str:
    return " ".join(_words(text))


@dataclass(frozen=True)
class Caption:
    """A drawing's caption and where its head came from: ``title`` or ``name`` (the file name:
    no title, or a collection's title); ``described`` when a description sentence follows."""

    text: str
    source: str
    described: bool


@dataclass(frozen=True)
class Collections:
    """Normalised titles and descriptions found on :data:`SHARED` or more drawings: they name
    a collection (``gramastar``, ``Part of Hotel Icons Collection``), not one drawing."""

    titles: frozenset[str] = frozenset()
    descriptions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, metas: Iterable[SvgMeta]) -> Collections:
        titles, descriptions = Counter(), Counter()
        for m in metas:
            titles[_norm(clean_title(m.title))] += 1
            descriptions[_norm(m.description)] += 1
        return cls(frozenset(t for t, n in titles.items() if t and n >= SHARED),
                   frozenset(d for d, n in descriptions.items() if d and n >= SHARED))


def caption_for(meta: SvgMeta, stem: str, collections: Collections = Collections(),
                max_words: int = MAX_CAPTION_WORDS) -> Caption:
    """The caption of the drawing whose file name is ``stem``: its cleaned title, or its name
    when there is no title, or when the title is a collection's and the name says more (has a
    word of three letters or more and lacks a word of the title); then the description's first
    sentence (:func:`first_sentence`) unless a collection shares it; at most ``max_words``."""
    title, name = clean_title(meta.title), stem_phrase(stem)
    informative = re.search(r"[A-Za-z]{3}", name) is not None
    if not title or (_norm(title) in collections.titles and informative
                     and not set(_words(title)) <= set(_words(name))):
        head, source = name, "name"
    else:
        head, source = title, "title"
    words = head.split()[:max_words]
    shared = _norm(meta.description) in collections.descriptions
    sentence = "" if shared else first_sentence(meta.description, head)
    room = max_words - len(words)
    if sentence and room >= 3:
        joiner = " " if words[-1][-1] in ".!?" else ". "
        return Caption(" ".join(words) + joiner + " ".join(sentence.split()[:room]), source, True)
    return Caption(" ".join(words), source, False)


def caption_stats(captions: list[Caption]) -> dict[str, Any]:
    """Where captions came from and how long they are (words)."""
    import statistics

    words = sorted(len(c.text.split()) for c in captions) or [0]
    bins = {"1-3": (1, 3), "4-7": (4, 7), "8-15": (8, 15), "16-30": (16, 30), "31+": (31, 10**9)}
    return {"from_title": sum(c.source == "title" for c in captions),
            "from_file_name": sum(c.source == "name" for c in captions),
            "with_description": sum(c.described for c in captions),
            "distinct": len({c.text for c in captions}),
            "words": {"min": words[0], "median": statistics.median(words),
                      "mean": round(statistics.fmean(words), 2), "p90": words[int(0.9 * (len(words) - 1))],
                      "max": words[-1]},
            "words_histogram": {k: sum(lo <= w <= hi for w in words) for k, (lo, hi) in bins.items()}}


