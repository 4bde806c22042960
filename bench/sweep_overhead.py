"""What a sweep costs beyond its training: a cliplab sweep against its floor and open_clip_train.

    .venv/bin/python bench/sweep_overhead.py                    # sweeps/demo.py's 5 trials, emoji corpus
    .venv/bin/python bench/sweep_overhead.py --corpus DIR --sweep sweeps/demo.py --skip-open-clip

On the same shards, model, global batch, steps and seed, one after another:

(a) **cliplab**: ``cliplab sweep SWEEP --no-register`` (tracking off) on a local Ray cluster that is
    started first and timed apart (a KubeRay cluster is already up when a user submits). Each
    trial is a Tune trial that launches a 2-worker ``TorchTrainer`` (gloo DDP); its rank 0 prints
    when its first step was done and one line per epoch, which give the time to first step and the
    per-epoch overhead (waiting for data, eval and report: the epoch's wall time minus its steps).
(b) **the floor**: the same trials in this process, no Ray: the same decode (:func:`read_decode`,
    in a background thread), the same global batch in one rank, ``train_step`` with all cores.
(c) **open_clip_train**: ``open_clip_train.main`` once per trial, one after another (its CLIP loss,
    ``--siglip`` for SigLIP: it has no CLOOB, MERU or X-CLR, so those trials run its CLIP loss at
    the same cost; ``--lock-text`` where the trial locks its text tower, as the LiT recipe does),
    one process with the global batch, ``--workers 1``, no val, fp32, reading the
    same training samples as image files and a TSV (its ``csv`` dataset; see :func:`csv_corpus`).

Prints a Markdown table and the ratios a/b and a/c; ``--out`` appends it to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIPLAB = Path(sys.executable).with_name("cliplab")


def build_corpus(out: Path) -> Path:
    """The emoji demo corpus and its caption embeddings (for X-CLR), as ``cliplab demo`` makes them."""
    if not (out / "stats.json").is_file():
        subprocess.run([str(CLIPLAB), "data", "emoji", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    if not (out / "train" / "caption-embeddings").is_dir():
        subprocess.run([str(CLIPLAB), "data", "embed-captions", str(out / "train")], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def corpus_overrides(corpus: Path) -> dict[str, str]:
    return {"data.train": str(corpus / "train"), "data.val": str(corpus / "val"),
            "data.caption_embeddings": str(corpus / "train" / "caption-embeddings")}


def trials(sweep_file: Path, overrides: dict[str, str]):
    """The sweep and one config per trial (grid points, in Tune's order)."""
    from cliplab.config import with_overrides
    from cliplab.tune.sweep import _enumerable_points, load_sweep

    sweep = load_sweep(sweep_file, [f"{k}={v}" for k, v in overrides.items()])
    return sweep, [with_overrides(sweep.base, point) for point in _enumerable_points(sweep.space)]


# -- (a) the cliplab sweep ---------------------------------------------------------------------

def run_cliplab(sweep_file: Path, overrides: dict[str, str], workdir: Path, concurrent: int | None = None) -> dict:
    from cliplab.services import RayService

    t0 = time.perf_counter()
    with RayService(workdir / "ray", num_cpus=os.cpu_count()) as ray_svc:
        ray_start = time.perf_counter() - t0
        env = {**os.environ, **ray_svc.env(), "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
        t1 = time.perf_counter()
        extra = ["--max-concurrent-trials", str(concurrent)] if concurrent else []
        runs = workdir / f"runs-{time.time_ns()}"
        proc = subprocess.run([str(CLIPLAB), "sweep", str(sweep_file), "--no-register", "--address", ray_svc.address,
                               "--set", f"storage_path={runs}", *extra, *sets],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t1
    log = proc.stdout + proc.stderr
    log_file = workdir / f"cliplab_sweep_x{concurrent or 'default'}.log"
    log_file.write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"cliplab sweep failed (log: {log_file}):\n{log[-3000:]}")
    first = [float(x) for x in re.findall(r"first step done ([\d.]+) s after the trial started", log)]
    overhead = [float(x) for x in re.findall(r"\| overhead ([\d.]+) s \(data wait", log)]
    return {"wall": wall, "ray_start": ray_start, "first_step": first, "epoch_overhead": overhead,
            "log_lines": log.count("\n")}


# -- (b) the floor: the same trials in one plain process ---------------------------------------

def floor_trial(cfg) -> float:
    """One trial's decode and steps in this process, no Ray: the wall time of its epochs."""
    import torch

    from cliplab.data.captions import load_caption_table
    from cliplab.data.plan import steps_per_epoch
    from cliplab.data.stream import RankStream, read_decode
    from cliplab.distributed import DistContext
    from cliplab.models import build_dual_encoder
    from cliplab.objectives import data_needs
    from cliplab.train.launch import train_index
    from cliplab.train.schedule import build_scheduler
    from cliplab.train.step import build_optimizer, train_step

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(cfg.train.seed)
    batch = cfg.data.batch_size * cfg.train.num_workers  # the sweep's global batch, in one rank
    data_cfg = dataclasses.replace(cfg.data, batch_size=batch)
    index = train_index(cfg)
    steps = steps_per_epoch(index, 1, batch)
    total = cfg.train.max_steps or cfg.train.epochs * steps
    t0 = time.perf_counter()
    _, module = build_dual_encoder(cfg)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    needs = data_needs(cfg.objective)
    table = load_caption_table(cfg.data.caption_embeddings, cfg.data.s3) if needs.caption_embeddings else None
    stream = RankStream(index, data_cfg, cfg.model.name, rank=0, world=1, steps=steps, views=needs.views,
                        captions_ref=table, decode_on="worker")
    stream._blocks = lambda plan, start: (  # decode in this thread, between steps: no thread oversubscribes the step's
        block for spec in stream.specs(plan, start)  # OpenMP threads (a decode thread beside 2 threads on 2 cores
        for block in read_decode({"spec": [spec]}, **stream._decode_kwargs()))  # ran each trial ~3x slower)
    ctx, done = DistContext(), 0
    for epoch in range(cfg.train.epochs):
        for b in stream.batches(epoch):
            train_step(module, b, optimizer, scheduler, ctx, grad_clip_norm=cfg.optim.grad_clip_norm)
            done += 1
            if done >= total:
                return time.perf_counter() - t0
    return time.perf_counter() - t0


# -- (c) open_clip_train, once per trial ---------------------------------------------------------

def csv_corpus(corpus: Path, out: Path) -> Path:
    """The training shards as image files and a TSV (``filepath``, ``title``): open_clip_train's
    ``--dataset-type csv``. (Its webdataset reader fails on the installed webdataset with
    ``KeyError: 'fname'`` in ``group_by_keys_nothrow``.) Written once, not timed."""
    import tarfile

    table = out / "train.tsv"
    if table.is_file():
        return table
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in sorted((corpus / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in members.items():
                stem, ext = name.rsplit(".", 1)
                if ext.lower() in ("png", "jpg", "jpeg", "webp") and f"{stem}.txt" in members:
                    image = out / Path(name).name
                    image.write_bytes(tar.extractfile(member).read())
                    caption = tar.extractfile(members[f"{stem}.txt"]).read().decode().strip()
                    rows.append(f"{image}\t{caption.replace(chr(9), ' ')}")
    table.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return table


def open_clip_trial(cfg, corpus: Path, workdir: Path) -> float:
    """``open_clip_train.main`` on the trial's training samples, model, global batch, epochs and lr: wall time."""
    from cliplab.models import CONFIG_DIR

    table = csv_corpus(corpus, workdir / "open_clip_csv")
    batch = cfg.data.batch_size * cfg.train.num_workers
    argv = ["--train-data", str(table), "--dataset-type", "csv", "--csv-separator", "\t",
            "--batch-size", str(batch), "--epochs", str(cfg.train.epochs),
            "--model", cfg.model.name, "--workers", "1", "--precision", "fp32", "--device", "cpu",
            "--lr", str(cfg.optim.lr), "--wd", str(cfg.optim.weight_decay), "--warmup", str(cfg.optim.warmup_steps),
            "--seed", str(cfg.train.seed), "--logs", str(workdir / "open_clip_logs"),
            "--name", f"{cfg.objective.name}-{time.time_ns()}", "--save-frequency", "0", "--report-to", "",
            "--log-every-n-steps", "100", *(["--siglip"] if cfg.objective.name == "siglip" else []),
            # LiT (cliplab's model.lock_text): open_clip's own text-tower lock, the projection trainable
            *(["--lock-text", "--lock-text-unlocked-layers", "0"] if cfg.model.lock_text else [])]
    # cliplab's bundled configs (cliplab-tiny, the LiT recipe's cliplab-tiny-minilm), with their
    # Hugging Face text tower pointed at the offline copy, as cliplab registers them
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cliplab.models import _register_bundled_configs; "
            "_register_bundled_configs(); from open_clip_train.main import main; main(sys.argv[2:])")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(CONFIG_DIR.parents[1]), *argv], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "HF_HUB_OFFLINE": "1",
                                          "TRANSFORMERS_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "demo.py", help="sweep file (default sweeps/demo.py)")
    p.add_argument("--corpus", type=Path, help="a corpus folder with train/ and val/ shards (default: the emoji "
                                               "corpus, built into --workdir)")
    p.add_argument("--workdir", type=Path, help="where the corpus, runs and logs go (default: a temporary folder)")
    p.add_argument("--concurrent", type=int, action="append", default=[], metavar="N",
                   help="also run (a) with --max-concurrent-trials N (repeatable; the sweep file's own setting "
                        "always runs)")
    p.add_argument("--skip-sweep", action="store_true", help="leave out (a): only the floor and open_clip_train")
    p.add_argument("--skip-open-clip", action="store_true", help="leave out (c)")
    p.add_argument("--skip-floor", action="store_true", help="leave out (b)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the sweep's base config in all three, e.g. --set train.epochs=1 (repeatable)")
    p.add_argument("--out", type=Path, help="append the Markdown table to this file")
    args = p.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cliplab-sweep-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or build_corpus(workdir / "emoji")
    overrides = {**corpus_overrides(corpus), **dict(o.split("=", 1) for o in args.set)}
    sweep, configs = trials(args.sweep, overrides)
    k, epochs = len(configs), configs[0].train.epochs
    print(f"{k} trials of {args.sweep.name} on {corpus}; workdir {workdir}", flush=True)

    if args.skip_sweep:
        b = [] if args.skip_floor else [floor_trial(cfg) for cfg in configs]
        if b:
            print(f"(b) floor: {sum(b):.1f} s ({', '.join(f'{x:.1f}' for x in b)})", flush=True)
        c = [] if args.skip_open_clip else [open_clip_trial(cfg, corpus, workdir) for cfg in configs]
        if c:
            print(f"(c) open_clip_train: {sum(c):.1f} s ({', '.join(f'{x:.1f}' for x in c)})")
        return
    a = run_cliplab(args.sweep, overrides, workdir)
    print(f"(a) cliplab sweep: {a['wall']:.1f} s (+ {a['ray_start']:.1f} s to start Ray)", flush=True)
    packed = {n: run_cliplab(args.sweep, overrides, workdir, concurrent=n) for n in args.concurrent}
    for n, run in packed.items():
        print(f"(a') cliplab sweep, {n} trials at once: {run['wall']:.1f} s", flush=True)
    b = [floor_trial(cfg) for cfg in configs] if not args.skip_floor else []
    if b:
        print(f"(b) floor: {sum(b):.1f} s ({', '.join(f'{x:.1f}' for x in b)})", flush=True)
    c = [open_clip_trial(cfg, corpus, workdir) for cfg in configs] if not args.skip_open_clip else []
    if c:
        print(f"(c) open_clip_train: {sum(c):.1f} s ({', '.join(f'{x:.1f}' for x in c)})", flush=True)

    def fmt(xs):
        return f"{statistics.median(xs):.1f} (max {max(xs):.1f})" if xs else "n/a"

    rows = [(f"(a) cliplab sweep, {sweep.max_concurrent_trials} trial(s) at once", a["wall"], fmt(a["first_step"]),
             fmt(a["epoch_overhead"]))]
    rows += [(f"(a) cliplab sweep, {n} trials at once", run["wall"], fmt(run["first_step"]), fmt(run["epoch_overhead"]))
             for n, run in packed.items()]
    if b:
        rows.append(("(b) floor: one process, no Ray", sum(b), "n/a", "0 (by definition)"))
    if c:
        rows.append(("(c) open_clip_train, one run per trial", sum(c), "n/a", "n/a"))
    lines = [f"{k} trials × {epochs} epochs ({args.sweep.name}, {configs[0].model.name}, global batch "
             f"{configs[0].data.batch_size * configs[0].train.num_workers}, {os.cpu_count()} cores; "
             f"Ray start-up {a['ray_start']:.1f} s not counted in (a))", "",
             "| run | wall s | time to first step s, median | per-epoch overhead s, median |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {wall:.1f} | {first} | {over} |" for name, wall, first, over in rows]
    lines.append("")
    for name, run in [("a", a), *((f"a (x{n})", r) for n, r in packed.items())]:
        if b:
            lines.append(f"{name}/b = {run['wall'] / sum(b):.2f} (goal ≤ 1.5)")
        if c:
            lines.append(f"{name}/c = {run['wall'] / sum(c):.2f} (goal ≤ 1.0)")
    lines.append(f"(a) printed {a['log_lines']} log lines")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with args.out.open("a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
