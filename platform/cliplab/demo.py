"""The main job: ``cliplab demo`` (what ``make demo`` runs).

On embedded defaults it starts a local S3 server, an MLflow server and a Ray cluster, renders the
emoji corpus into shards, embeds its captions for X-CLR (a Ray Data job), uploads both to S3, runs
``sweeps/demo.py`` on Ray Tune (one TorchTrainer per trial and objective, 2 CPU workers with gloo
DDP), registers the best trial as ``cliplab-demo@champion`` and prints a table with a row per
objective; then evaluates every objective's final model on Fashion-MNIST (zero-shot), the emoji
groups (zero-shot) and the val split (retrieval, MERU's entailment rate). Everything lives under ``--workdir``; runs and
models persist there, so ``cliplab services mlflow --dir WORKDIR/services/mlflow`` reopens them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from cliplab.config import S3Config, with_overrides
from cliplab.errors import ConfigError

BUCKET = "cliplab"


def _quick(sweep):
    """Fewer trials and steps for ``--quick``: the first swept key only, a short run on one
    worker, two trials at a time (each trial's start-up, mostly new processes importing torch,
    is most of a short trial; two of them overlap on two cores)."""
    first = next(iter(sweep.space))
    base_overrides = {"train.epochs": 1, "train.max_steps": 8, "train.num_workers": 1}
    return dataclasses.replace(sweep, space={first: sweep.space[first]}, max_concurrent_trials=2,
                               base=with_overrides(sweep.base, base_overrides))


def run_demo(workdir: Path, sweep_file: Path, *, quick: bool = False, keep: bool = False,
             extra_overrides: list[str] | None = None) -> dict:
    """The six steps: corpus, services, caption embeddings and upload, the sweep, its results,
    the eval of every objective's final model. Returns the sweep and its outcome."""
    from cliplab.services import MlflowService, RayService, S3Service
    from cliplab.tune import load_sweep

    workdir = workdir.resolve()
    if not sweep_file.is_file():
        raise ConfigError(f"sweep file not found: {sweep_file} (run the demo from the repository root)")
    t0 = time.perf_counter()
    corpus = _emoji_corpus(workdir / "data" / "emoji")

    print("[2/6] services: starting S3 (SeaweedFS), MLflow and Ray on 127.0.0.1")
    with S3Service(workdir / "services" / "s3", buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env())  # the driver and the Ray cluster (started next) read S3 with these
        with MlflowService(workdir / "services" / "mlflow") as mlflow_svc, \
                RayService(workdir / "services" / "ray") as ray_svc:
            os.environ.update(ray_svc.env())
            print(f"      S3 {s3.endpoint} | MLflow {mlflow_svc.uri} | Ray dashboard {ray_svc.dashboard_url}")
            _caption_embeddings(corpus, ray_svc.address)
            sweep = load_sweep(sweep_file, [*_stage_on_s3(corpus, s3.endpoint), f"tracking.uri={mlflow_svc.uri}",
                                            f"storage_path={workdir / 'runs'}", *(extra_overrides or [])])
            if quick:
                sweep = _quick(sweep)
            print(f"[4/6] sweep {sweep_file}: {sweep.num_trials} trials on Ray Tune")
            try:
                outcome = _sweep_and_eval(sweep, workdir, ray_svc.address, quick=quick)
                print(f"\nMLflow UI:     {mlflow_svc.uri}  (experiment '{sweep.base.tracking.experiment}')")
                print(f"Ray dashboard: {ray_svc.dashboard_url}")
                print(f"finished in {time.perf_counter() - t0:.0f} s")
                if keep:
                    _wait_for_ctrl_c()
            finally:
                import ray

                ray.shutdown()  # disconnect before the cluster goes away
    print(f"services stopped; browse the runs again with "
          f"`cliplab services mlflow --dir {workdir / 'services' / 'mlflow'}`")
    return {"outcome": outcome, "sweep": sweep}


def _emoji_corpus(corpus: Path) -> Path:
    """Step 1: the emoji corpus's shards in ``corpus``, rendered unless they are there already."""
    from cliplab.data.emoji import build_emoji_corpus

    if (corpus / "stats.json").is_file():
        print(f"[1/6] emoji corpus: reusing {corpus}")
    else:
        print(f"[1/6] emoji corpus: rendering into {corpus}")
        build_emoji_corpus(corpus)
    return corpus


def _caption_embeddings(corpus: Path, ray_address: str) -> None:
    """Step 3: X-CLR's caption embeddings of the train split (a Ray Data job), unless the ones
    there are newer than the corpus."""
    from cliplab.data.captions import EMBED_DIR, embed_captions
    from cliplab.data.sources import resolve_shards
    from cliplab.ray_connect import init_ray

    captions = corpus / "train" / EMBED_DIR
    if any(captions.glob("*.parquet")) and captions.stat().st_mtime >= (corpus / "stats.json").stat().st_mtime:
        print(f"[3/6] caption embeddings (X-CLR): reusing {captions}")
        return
    init_ray(ray_address)
    _, rows = embed_captions(resolve_shards(str(corpus / "train"), S3Config()), str(captions))
    print(f"[3/6] caption embeddings (X-CLR): {rows} train captions -> {captions}")


def _stage_on_s3(corpus: Path, endpoint: str) -> list[str]:
    """The corpus (caption embeddings included) uploaded to the demo bucket; the ``--set``
    overrides that point the sweep's data at it."""
    from cliplab.data.captions import EMBED_DIR
    from cliplab.data.sources import upload

    n = upload(corpus, f"s3://{BUCKET}/emoji", S3Config(endpoint_url=endpoint))
    print(f"      uploaded {n} files to s3://{BUCKET}/emoji/")
    return [f"data.train=s3://{BUCKET}/emoji/train/", f"data.val=s3://{BUCKET}/emoji/val/",
            f"data.caption_embeddings=s3://{BUCKET}/emoji/train/{EMBED_DIR}", f"data.s3.endpoint_url={endpoint}"]


def _sweep_and_eval(sweep, workdir: Path, ray_address: str, *, quick: bool):
    """Steps 4 to 6: the sweep on Ray Tune, its results table, then every objective's final model
    through ``cliplab eval``'s code (``--quick``: the champion only, in process). Returns the
    sweep's outcome."""
    from cliplab.tune import run_sweep
    from cliplab.tune.report import outcome_text

    outcome = run_sweep(sweep, address=ray_address)
    print("[5/6] results\n")
    print(outcome_text(sweep, outcome))
    print("\n[6/6] eval of every objective's final model (`cliplab eval`'s code): zero-shot on "
          "Fashion-MNIST and emoji groups, val retrieval, MERU's entailment\n")
    sets = eval_sets(workdir, fmnist_limit=500 if quick else 2000)
    rows = [outcome.best] if quick and outcome.best else outcome.rows
    print_eval_table(evaluate_trials(rows, sets, workdir / "eval", use_ray=not quick))
    return outcome


def _wait_for_ctrl_c() -> None:
    print("services stay up; press Ctrl-C to stop them")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def eval_sets(workdir: Path, *, fmnist_limit: int = 2000) -> list[str]:
    """The demo's eval sets (built once): Fashion-MNIST (10 real photo classes, zero-shot), the
    emoji val split as a classification set (groups as classes) and the val shards (retrieval)."""
    from cliplab.data.emoji import build_emoji_eval_set
    from cliplab.data.evalsets import build_fashion_mnist

    fmnist, emoji_groups = workdir / "data" / "fashion-mnist", workdir / "data" / "emoji-groups"
    if not (fmnist / "classnames.txt").is_file():
        build_fashion_mnist(fmnist, limit=fmnist_limit, image_px=64, progress=False)
    if not (emoji_groups / "classnames.txt").is_file():
        build_emoji_eval_set(emoji_groups, image_px=64, progress=False)
    return [str(fmnist), str(emoji_groups), str(workdir / "data" / "emoji" / "val")]


def evaluate_trials(rows: list[dict], sets: list[str], out: Path, *, use_ray: bool = True) -> list[dict]:
    """Every trial's final checkpoint through ``cliplab eval``'s code; one row per objective."""
    from cliplab.eval.runner import run_eval

    table = []
    for row in rows:
        ckpt = row.get("checkpoint_path")
        if not ckpt:
            continue
        objective = row.get("objective.name") or "?"
        report = run_eval(ckpt, sets, out_dir=out / objective, use_ray=use_ray, progress=False, traversals=100)
        fm, groups, val = (d["metrics"] for d in report["datasets"])  # in the order of ``sets``
        table.append({"objective": objective, "fmnist": fm.get("zeroshot_top1"),
                      "groups": groups.get("zeroshot_top1"), "i2t": val.get("image_to_text_R1"),
                      "t2i": val.get("text_to_image_R1"), "i2t10": val.get("image_to_text_R10"),
                      "entail": val.get("lens/entailment_rate")})
    return table


def print_eval_table(table: list[dict]) -> None:
    from cliplab.report import markdown_table

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [{k: (v if k == "objective" else fmt(v)) for k, v in r.items()} for r in table]
    print(markdown_table(rows, [("objective", "objective"), ("Fashion-MNIST zero-shot top-1", "fmnist"),
                                ("emoji groups zero-shot top-1", "groups"), ("val R@1 i→t", "i2t"),
                                ("val R@1 t→i", "t2i"), ("val R@10 i→t", "i2t10"),
                                ("MERU entailment rate", "entail")]))
