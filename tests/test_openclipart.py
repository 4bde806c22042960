"""`cliplab data openclipart`: the Open Clip Art corpus from a synthetic tree shaped like Debian's
openclipart-png/-svg (and, where the packages are installed, a small slice of the real one)."""

import io
import os
import time

import pytest
from PIL import Image

from cliplab.data.clipart_captions import Collections, SvgMeta, caption_for, read_svg_meta, stem_phrase
from cliplab.data.evalsets import read_classnames
from cliplab.data.openclipart import ROOT, build_openclipart_corpus, build_openclipart_eval_set, scan, val_keys
from cliplab.data.shards import read_shard_samples

RDF = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" "http://www.w3.org/TR/2001/REC-SVG-20010904/DTD/svg10.dtd">
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag><rdf:li></rdf:li>{keywords}</rdf:Bag></dc:subject>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""
NO_METADATA = '<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"/></svg>\n'
BROKEN = '<svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF><cc:Work><dc:title>half'
LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE svg [\n<!ENTITY a "aaaaaaaaaa">\n'
          + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">\n' for i in range(8))
          + ']>\n<svg><metadata><rdf:RDF><cc:Work><dc:title>&i;</dc:title></cc:Work></rdf:RDF></metadata></svg>\n')


def _svg(title, description="", keywords=()):
    return RDF.format(title=title, description=description,
                      keywords="".join(f"<rdf:li>{k}</rdf:li>" for k in keywords))


def _png(color, size=(40, 20), transparent=False):
    im = Image.new("RGBA", size, (*color, 255))
    if transparent:
        im.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))  # left half: fully transparent black
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


#: rel path → (PNG bytes, SVG text); the layout of /usr/share/openclipart/{png,svg}
TREE = {
    "animals/mammals/black_cat_jane_doe_01": (_png((0, 0, 0), (600, 300), transparent=True), _svg(
        "black_cat", "A black cat sitting on a mat. It purrs.", ("cat", "animal"))),
    "animals/mammals/dog_01": (_png((120, 80, 40)), _svg("Dog", "dog")),
    "animals/birds/owl_john_01": (_png((90, 90, 90)), _svg("Owl", "mail me at john@example.org please", ("owl",))),
    "animals/parrot_02": (_png((0, 200, 0)), NO_METADATA),
    "animals/fish": (_png((0, 0, 200)), BROKEN),
    "food/fruit/apple_01": (_png((200, 0, 0)), _svg("Red &amp;amp; shiny apple", "", ("fruit",))),
    "food/fruit/pear": (_png((200, 200, 0)), _svg("pear")),
    "food/pizza_slice": (_png((250, 150, 0)), LAUGHS),
    "food/broken_bread": (b"\x89PNG\r\n\x1a\n not really a png", _svg("bread")),
    "food/lemon_copy": (_png((200, 0, 0)), _svg("Lemon")),  # the apple's bytes again
    "unsorted/Pinguino1": (_png((10, 10, 10)), _svg("Pinguino")),
    "unsorted/anatra": (_png((20, 20, 200)), _svg("Anatra")),
    "unsorted/BasseTemperature": (_png((200, 20, 200)), NO_METADATA),
    "logos/only_logo": (_png((1, 2, 3)), _svg("a logo")),
}
MIN = 3  # animals 5, food 6 (less 1 symlink), unsorted 3 kept; logos 1 skipped


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "openclipart"
    for rel, (png, svg) in TREE.items():
        for kind, data in (("png", png), ("svg", svg)):
            path = root / kind / f"{rel}.{kind}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data) if kind == "png" else path.write_text(svg, encoding="utf-8")
    for kind in ("png", "svg"):  # the packages file some drawings twice, by relative symlink
        os.symlink(f"../animals/mammals/dog_01.{kind}", root / kind / "food" / f"hot_dog.{kind}")
    return root


def _samples(out, split):
    return [s for shard in sorted((out / split).glob("*.tar")) for s in read_shard_samples(shard)]


def test_svg_metadata_is_read_safely_and_failures_are_statuses(tree):
    svg = tree / "svg"
    meta = read_svg_meta(svg / "animals/mammals/black_cat_jane_doe_01.svg")
    assert meta == SvgMeta("black_cat", "A black cat sitting on a mat. It purrs.", ("cat", "animal"), "ok")
    assert read_svg_meta(svg / "animals/parrot_02.svg").status == "no_title"
    assert read_svg_meta(svg / "animals/fish.svg").status == "broken"
    assert read_svg_meta(svg / "nowhere.svg").status == "missing"
    t0 = time.perf_counter()
    assert read_svg_meta(svg / "food/pizza_slice.svg") == SvgMeta(status="entities_refused")  # 10^9 a's never built
    assert time.perf_counter() - t0 < 1
    assert read_svg_meta(svg / "food/fruit/pear.svg", max_bytes=100).status == "too_large"


def test_captions_titles_names_descriptions_and_collections():
    assert stem_phrase("chemistry_flask_matthew__02") == "chemistry flask matthew"
    assert stem_phrase("white_d_7") == "white d 7" and stem_phrase("BasseTemperature") == "Basse Temperature"
    meta = SvgMeta("Clipart by Nicu Buculei - piggy_bank", "A pink  piggy bank for coins!  Really.")
    assert caption_for(meta, "piggybank_01").text == "piggy bank. A pink piggy bank for coins!"
    assert caption_for(SvgMeta("Bread", "bread, fresh"), "b").text == "Bread"  # under three words
    assert caption_for(SvgMeta("Bread", "Fresh bread from the oven"), "b").described is True
    assert caption_for(SvgMeta("Bread", "A bread"), "b").described is False  # the title again
    assert caption_for(SvgMeta("", ""), "hot_dog_01").text == "hot dog"
    stars = Collections(titles=frozenset({"gramastar", "stick man", "battery"}), descriptions=frozenset({"uk road signs"}))
    assert caption_for(SvgMeta("gramastar"), "star_05pt02step", stars) == caption_for(SvgMeta(), "star_05pt02step")
    assert caption_for(SvgMeta("gramastar"), "star_05pt02step", stars).source == "name"
    assert caption_for(SvgMeta("stick man"), "sm_001", stars).text == "stick man"  # the name says less
    assert caption_for(SvgMeta("battery"), "battery_snuata_01", stars).text == "battery"  # the name has the title
    assert caption_for(SvgMeta("Stop", "UK road signs"), "x", stars).text == "Stop"
    long = caption_for(SvgMeta(" ".join(["word"] * 20), "This sentence is long " * 5 + "."), "x")
    assert len(long.text.split()) == 30 and long.described


def test_corpus_captions_categories_skips_and_images(tree, tmp_path):
    stats = build_openclipart_corpus(tmp_path / "out", root=tree, min_per_category=MIN, val_fraction=0.3,
                                     image_px=64, samples_per_shard=4, workers=1, progress=False)
    assert stats["skipped"] == {"duplicate": 2, "small_category": 1, "unreadable_png": 1}
    assert stats["small_categories"] == {"logos": 1}
    assert stats["categories"] == {"animals": 5, "food": 3, "unsorted": 3}
    assert stats["svg_metadata"] == {"ok": 7, "no_title": 2, "broken": 1, "entities_refused": 1}
    samples = {s.meta["source"]: s for split in ("train", "val") for s in _samples(tmp_path / "out", split)}
    captions = {src.removeprefix("png/").removesuffix(".png"): s.caption for src, s in samples.items()}
    assert captions == {
        "animals/mammals/black_cat_jane_doe_01": "black cat. A black cat sitting on a mat.",
        "animals/mammals/dog_01": "Dog",
        "animals/birds/owl_john_01": "Owl",  # an e-mail address is no description
        "animals/parrot_02": "parrot",  # no metadata: the file name
        "animals/fish": "fish",  # broken SVG: the file name
        "food/fruit/apple_01": "Red & shiny apple",
        "food/fruit/pear": "pear",
        "food/pizza_slice": "pizza slice",  # entities refused: the file name
        "unsorted/Pinguino1": "Pinguino",
        "unsorted/anatra": "Anatra",
        "unsorted/BasseTemperature": "Basse Temperature",
    }
    cat = samples["png/animals/mammals/black_cat_jane_doe_01.png"]
    assert (cat.meta["category"], cat.meta["folder"], cat.meta["title"], cat.meta["keywords"]) == (
        "animals", "animals/mammals", "black cat", ["cat", "animal"])
    assert cat.key.startswith("oc") and len(cat.key) == 18
    image = Image.open(io.BytesIO(cat.image))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 32))
    assert image.getpixel((2, 16)) == (255, 255, 255) and image.getpixel((60, 16)) == (0, 0, 0)
    assert stats["captions"]["from_title"] == 7 and stats["captions"]["from_file_name"] == 4
    assert stats["captions"]["with_description"] == 1 and stats["captions"]["words"]["max"] == 9


def test_split_is_deterministic_and_gives_every_category_a_val_key(tree, tmp_path):
    kwargs = {"root": tree, "min_per_category": MIN, "val_fraction": 0.2, "seed": 3, "image_px": 32,
              "samples_per_shard": 3, "workers": 1, "progress": False}
    a = build_openclipart_corpus(tmp_path / "a", **kwargs)
    b = build_openclipart_corpus(tmp_path / "b", **kwargs)
    assert a == b
    for split in ("train", "val"):
        for shard in a["splits"][split]["shards"]:
            assert (tmp_path / "a" / split / shard).read_bytes() == (tmp_path / "b" / split / shard).read_bytes()
    val = {s.key for s in _samples(tmp_path / "a", "val")}
    found = scan(tree, min_per_category=MIN)
    assert val == val_keys(found.arts, 0.2, 3) - {a.key for a in found.arts if a.png.name in ("broken_bread.png", "lemon_copy.png")}
    assert {x.category for x in found.arts if x.key in val_keys(found.arts, 0.2, 3)} == {"animals", "food", "unsorted"}
    assert set(a["categories_by_split"]["val"]) == {"animals", "unsorted"}  # food's one val drawing is the corrupt PNG
    limited = scan(tree, min_per_category=MIN, limit=4)  # round-robin: every category, a subset
    assert {x.category for x in limited.arts} == {"animals", "food", "unsorted"} and len(limited.arts) == 4
    assert {x.rel for x in limited.arts} <= {x.rel for x in found.arts}


def test_eval_set_is_the_val_split_over_the_categories(tree, tmp_path, capsys):
    from cliplab.cli.main import main

    assert main(["data", "openclipart", "--source", str(tree), "--out", str(tmp_path / "c"), "--eval",
                 str(tmp_path / "e"), "--min-per-category", str(MIN), "--val-fraction", "0.5", "--image-px", "32",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "categories: animals (5), food (3), unsorted (3)" in out and "zero-shot eval set" in out
    assert read_classnames((tmp_path / "e" / "classnames.txt").read_text(), "x") == ["animals", "food"]
    assert "clip art of {}." in (tmp_path / "e" / "templates.txt").read_text().splitlines()
    corpus_val = {s.key: s.meta["category"] for s in _samples(tmp_path / "c", "val")}
    import tarfile

    got = {}
    for shard in sorted((tmp_path / "e").glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    got[m.name.removesuffix(".cls")] = ["animals", "food"][int(tar.extractfile(m).read())]
    assert got == {k: c for k, c in corpus_val.items() if c != "unsorted"} and got
    stats = build_openclipart_eval_set(tmp_path / "all", root=tree, split="all", min_per_category=MIN,
                                       image_px=32, workers=1, progress=False)
    assert stats["per_class"] == {"animals": 5, "food": 3}
    assert stats["skipped"] == {"excluded_category": 3, "unreadable_png": 1, "duplicate": 1}


@pytest.mark.skipif(not (ROOT / "png").is_dir(), reason=f"{ROOT} is absent: install Debian's openclipart-png "
                                                         "and openclipart-svg (`make setup`)")
def test_the_real_packages_build_a_small_corpus(tmp_path):
    stats = build_openclipart_corpus(tmp_path / "out", limit=40, image_px=48, workers=1, progress=False)
    assert 35 <= stats["samples"] <= 40
    assert len(stats["categories"]) >= 15  # round-robin over the categories
    assert stats["skipped"]["duplicate"] > 0 and stats["small_categories"]
    samples = _samples(tmp_path / "out", "train") + _samples(tmp_path / "out", "val")
    assert all(1 <= len(s.caption.split()) <= 30 and s.meta["category"] in stats["categories"] for s in samples)
    assert stats["captions"]["from_title"] > 0 and stats["svg_metadata"].get("ok", 0) > 0
    assert all(max(Image.open(io.BytesIO(s.image)).size) <= 48 for s in samples)
