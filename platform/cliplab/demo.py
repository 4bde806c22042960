"""The main job: ``cliplab demo`` (what ``make demo`` runs).

On embedded defaults it starts a local S3 server, an MLflow server and a Ray cluster, renders the
emoji corpus into shards, embeds its captions for X-CLR (a Ray Data job), uploads both to S3, runs
``sweeps/demo.py`` on Ray Tune (one TorchTrainer per trial and objective, 2 CPU workers with gloo
DDP), registers the best trial as ``cliplab-demo@champion`` and prints a table with a row per
objective. Everything lives under ``--workdir``; runs and
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
    """Fewer trials and steps for ``--quick``: the first swept key only, and a short run."""
    first = next(iter(sweep.space))
    base_overrides = {"train.epochs": 1, "train.max_steps": 8}
    return dataclasses.replace(sweep, space={first: sweep.space[first]},
                               base=with_overrides(sweep.base, base_overrides))


def run_demo(workdir: Path, sweep_file: Path, *, quick: bool = False, keep: bool = False,
             extra_overrides: list[str] | None = None) -> dict:
    from cliplab.cli.sweep_cmd import print_outcome
    from cliplab.data.captions import EMBED_DIR, embed_captions
    from cliplab.data.emoji import build_emoji_corpus
    from cliplab.data.sources import resolve_shards, upload
    from cliplab.services import MlflowService, RayService, S3Service
    from cliplab.train.launch import init_ray
    from cliplab.tune import load_sweep, run_sweep

    workdir = workdir.resolve()
    if not sweep_file.is_file():
        raise ConfigError(f"sweep file not found: {sweep_file} (run the demo from the repository root)")
    t0 = time.perf_counter()
    corpus = workdir / "data" / "emoji"
    if (corpus / "stats.json").is_file():
        print(f"[1/5] emoji corpus: reusing {corpus}")
    else:
        print(f"[1/5] emoji corpus: rendering into {corpus}")
        build_emoji_corpus(corpus)

    print("[2/5] services: starting S3 (SeaweedFS), MLflow and Ray on 127.0.0.1")
    with S3Service(workdir / "services" / "s3", buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env())  # the driver and the Ray cluster (started next) read S3 with these
        with MlflowService(workdir / "services" / "mlflow") as mlflow_svc, \
                RayService(workdir / "services" / "ray") as ray_svc:
            os.environ.update(ray_svc.env())
            print(f"      S3 {s3.endpoint} | MLflow {mlflow_svc.uri} | Ray dashboard {ray_svc.dashboard_url}")
            captions = corpus / "train" / EMBED_DIR
            if any(captions.glob("*.parquet")) and \
                    captions.stat().st_mtime >= (corpus / "stats.json").stat().st_mtime:
                print(f"[3/5] caption embeddings (X-CLR): reusing {captions}")
            else:
                init_ray(ray_svc.address)
                _, rows = embed_captions(resolve_shards(str(corpus / "train"), S3Config()), str(captions))
                print(f"[3/5] caption embeddings (X-CLR): {rows} train captions -> {captions}")
            n = upload(corpus, f"s3://{BUCKET}/emoji", S3Config(endpoint_url=s3.endpoint))
            print(f"      uploaded {n} files to s3://{BUCKET}/emoji/")
            overrides = [
                f"data.train=s3://{BUCKET}/emoji/train/",
                f"data.val=s3://{BUCKET}/emoji/val/",
                f"data.caption_embeddings=s3://{BUCKET}/emoji/train/{EMBED_DIR}",
                f"data.s3.endpoint_url={s3.endpoint}",
                f"tracking.uri={mlflow_svc.uri}",
                f"storage_path={workdir / 'runs'}",
                *(extra_overrides or []),
            ]
            sweep = load_sweep(sweep_file, overrides)
            if quick:
                sweep = _quick(sweep)
            print(f"[4/5] sweep {sweep_file}: {sweep.num_trials} trials on Ray Tune")
            try:
                outcome = run_sweep(sweep, address=ray_svc.address)
                print("[5/5] results\n")
                print_outcome(sweep, outcome)
                print(f"\nMLflow UI:     {mlflow_svc.uri}  (experiment '{sweep.base.tracking.experiment}')")
                print(f"Ray dashboard: {ray_svc.dashboard_url}")
                print(f"finished in {time.perf_counter() - t0:.0f} s")
                if keep:
                    print("services stay up; press Ctrl-C to stop them")
                    try:
                        while True:
                            time.sleep(3600)
                    except KeyboardInterrupt:
                        pass
            finally:
                import ray

                ray.shutdown()  # disconnect before the cluster goes away
    print(f"services stopped; browse the runs again with "
          f"`cliplab services mlflow --dir {workdir / 'services' / 'mlflow'}`")
    return {"outcome": outcome, "sweep": sweep}

