"""Data throughput: cliplab's training stream vs webdataset's WebLoader, same shards on local S3.

Starts a SeaweedFS S3 server (cliplab.services.S3Service), writes synthetic JPEG shards and
uploads them, then reads every sample through

* **cliplab**: the shard index + one rank's :class:`~cliplab.data.stream.RankStream` (Ray Data
  CPU tasks: byte-range reads, decode, open_clip train transform, tokenize; the consumer
  re-batches and normalises), on a local Ray with ``--cpus`` CPUs;
* **webdataset**: ``WebDataset("pipe:python s3cat.py URL")`` → shuffle(1000) → PIL decode →
  the same open_clip train transform and tokenizer → batched, in a ``WebLoader`` with
  ``--cpus`` worker processes.

Both produce batches of ``--batch`` normalised float images and int64 tokens. Each reads one
untimed warm-up epoch, then a second epoch; it prints samples/s and samples/s per CPU core of the
second epoch's steady state (after its first 20% of samples).

    .venv/bin/python bench/data_throughput.py --samples 3000 --cpus 2
    .venv/bin/python bench/data_throughput.py --store local --cpus 16   # shards on local disk, no S3 server

With ``--store local`` both read the same shard files from local disk (webdataset opens the paths
itself), which isolates the per-core decode/augment/tokenize cost from the S3 transport.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

S3CAT = """import os, sys, boto3
bucket, _, key = sys.argv[1][len("s3://"):].partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
body = s3.get_object(Bucket=bucket, Key=key)["Body"]
for chunk in iter(lambda: body.read(1 << 20), b""):
    sys.stdout.buffer.write(chunk)
"""


def make_shards(out: Path, samples: int, per_shard: int, width: int, height: int) -> None:
    from PIL import Image

    from cliplab.data.shards import Sample, write_split

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    jpegs = []  # 97 distinct noisy JPEGs, cycled: the same decode cost as all-distinct, far faster to build
    for i in range(min(samples, 97)):
        noise = rng.integers(0, 64, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(((base + noise + 17 * i) % 256).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())

    def gen():
        for i in range(samples):
            yield Sample(f"{i:09d}", jpegs[i % len(jpegs)], "jpg", f"a synthetic photo number {i} of a gradient")

    write_split(gen(), out, "train", samples_per_shard=per_shard)


def bench_cliplab(url: str, s3cfg, model: str, batch: int, cpus: int, window: int, device: str) -> tuple[int, float]:
    import ray
    import torch

    from cliplab.config import DataConfig, S3Config
    from cliplab.data.index import build_train_index
    from cliplab.data.sources import resolve_shards
    from cliplab.data.stream import RankStream

    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray nices workers to 15; WebLoader's workers run at 0
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=cpus, logging_level="WARNING", include_dashboard=False)
    try:
        index = build_train_index([("bench", 1.0, resolve_shards(url, s3cfg))])
        n = int(index.counts().sum())
        cfg = DataConfig(train=url, s3=s3cfg or S3Config(), batch_size=batch, cpus_per_task=1.0, shuffle_window=window)
        stream = RankStream(index, cfg, model, rank=0, world=1, steps=n // batch, device=torch.device(device))
        to_torch, spent = stream.to_torch, [0.0]

        def timed_to_torch(b):  # the consumer's own share: pinning, the copy to the device, normalising
            t0 = time.perf_counter()
            out = to_torch(b)
            spent[0] += time.perf_counter() - t0
            return out

        stream.to_torch = timed_to_torch
        for _ in stream.batches(0):  # warm-up epoch: Ray starts its worker processes, each imports torch
            pass
        spent[0] = 0.0
        seen, seconds = _timed((len(b["image"]) for b in stream.batches(1)), n)
        print(f"cliplab consumer (to_torch on {device}): {spent[0]:.1f} s of the timed epoch's batches", flush=True)
        return seen, seconds
    finally:
        ray.shutdown()


def bench_webdataset(urls: list[str], model: str, batch: int, cpus: int, total: int,
                     device: str) -> tuple[int, float]:
    import torch
    import webdataset as wds

    from cliplab.models import preprocessing

    transform, tokenizer = preprocessing(model, True)

    def tokens(caption: str):
        return tokenizer([caption])[0]

    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0,
                         empty_check=False)
          .shuffle(1000).decode("pil").to_tuple("jpg", "txt").map_tuple(transform, tokens).batched(batch))
    cuda = device.startswith("cuda")
    loader = wds.WebLoader(ds, batch_size=None, num_workers=cpus, pin_memory=cuda,
                           worker_init_fn=lambda _: torch.set_num_threads(1))

    def on_device():  # batches on the training device, as cliplab's stream delivers them
        for images, text in loader:
            yield images.to(device, non_blocking=cuda), text.to(device, non_blocking=cuda)

    for _ in on_device():  # warm-up epoch, as for cliplab
        pass
    return _timed((len(images) for images, _text in on_device()), total)


def _timed(batch_sizes, total: int, warmup: float = 0.2) -> tuple[int, float]:
    """Samples and seconds after the first ``warmup`` share of the epoch (process start-up,
    imports and the first window excluded), to the last batch."""
    seen, counted, start = 0, 0, None
    for n in batch_sizes:
        seen += n
        if start is None:
            if seen >= warmup * total:
                start = time.perf_counter()
        else:
            counted += n
    return counted, time.perf_counter() - start


def run_both(args, wds_urls: list[str], cliplab_url: str, s3cfg) -> dict:
    """Both pipelines over the same shards, webdataset first; samples/s overall and per core."""
    results = {}
    for name, run in (("webdataset", lambda: bench_webdataset(wds_urls, args.model, args.batch, args.cpus,
                                                              args.samples, args.device)),
                      ("cliplab", lambda: bench_cliplab(cliplab_url, s3cfg, args.model, args.batch, args.cpus,
                                                        args.window, args.device))):
        seen, seconds = run()
        results[name] = {"samples": seen, "seconds": round(seconds, 2), "samples_per_s": round(seen / seconds, 1),
                         "samples_per_s_per_core": round(seen / seconds / args.cpus, 1)}
        print(f"{name:11s} {seen} samples in {seconds:.1f} s: {seen / seconds:.0f} samples/s, "
              f"{seen / seconds / args.cpus:.0f} per core", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--size", default="512x384", help="JPEG width x height (default 512x384)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model whose train transform is used (224 px)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=256, help="cliplab data.shuffle_window (one read task each)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--device", default=None,
                        help="where the batches are delivered (default: cuda if available, else cpu)")
    parser.add_argument("--store", choices=("s3", "local"), default="s3",
                        help="where both read the shards: the local S3 server (default) or local disk")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    import torch

    torch.set_num_threads(1)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CLIPLAB_INDEX_CACHE"] = str(Path(tmp) / "index")
        make_shards(Path(tmp) / "shards", args.samples, args.per_shard, width, height)
        names = sorted(p.name for p in (Path(tmp) / "shards" / "train").glob("*.tar"))
        if args.store == "local":
            results = run_both(args, [str(Path(tmp) / "shards" / "train" / n) for n in names],
                               str(Path(tmp) / "shards" / "train") + "/", None)
        else:
            from cliplab.config import S3Config
            from cliplab.data.sources import upload
            from cliplab.services import S3Service

            with S3Service(Path(tmp) / "s3", buckets=("bench",)) as s3:
                os.environ.update(s3.env())
                os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
                s3cfg = S3Config(endpoint_url=s3.endpoint)
                upload(Path(tmp) / "shards", "s3://bench/shards", s3cfg)
                cat = Path(tmp) / "s3cat.py"
                cat.write_text(S3CAT)
                results = run_both(args, [f"pipe:{sys.executable} {cat} s3://bench/shards/train/{n}" for n in names],
                                   "s3://bench/shards/train/", s3cfg)
    ratio = results["cliplab"]["samples_per_s"] / results["webdataset"]["samples_per_s"]
    per_core = results["cliplab"]["samples_per_s_per_core"]
    summary = {"store": args.store, "device": args.device, "cpus": args.cpus, "image": args.size, "model": args.model, "batch": args.batch, **results,
               "ratio_cliplab_over_webdataset": round(ratio, 2),
               "cores_for_6000_samples_per_s": int(np.ceil(6000 / per_core))}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
