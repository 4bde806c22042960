"""What Ray Train itself costs per run: a ``TorchTrainer`` whose loop does nothing, fitted several
times in a row on a local Ray, under Ray's defaults and under cliplab's (``launch.RAY_TRAIN_DEFAULTS``:
the controller polls its workers every 0.5 s instead of 2 s, no preemption-watcher actor).

Each setting runs in a fresh process (its own local Ray, the variables set before Ray starts),
the two settings alternate ``--rounds`` times, and the first fit of each process (Ray's own
warm-up) is left out of the medians::

    .venv/bin/python bench/ray_train_startup.py --rounds 2 --trainers 4

Results: docs/PERFORMANCE.md ("Ray Train's own start and end").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "ray defaults": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"},
    "cliplab defaults": None,  # filled from cliplab.train.launch.RAY_TRAIN_DEFAULTS
}


def _child(trainers: int) -> None:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):  # nothing: what is left is Ray Train's own start, polls and end
        pass

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    fits = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(trainers):
            t0 = time.time()
            TorchTrainer(loop, torch_config=TorchConfig(backend="gloo"),
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(name=f"startup-{i}", storage_path=storage)).fit()
            fits.append(time.time() - t0)
    ray.shutdown()
    print("RESULT " + json.dumps({"fits": fits}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times each setting runs, alternating")
    parser.add_argument("--trainers", type=int, default=4, help="fits per process (the first is left out)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.trainers)

    sys.path.insert(0, str(ROOT / "platform"))
    from cliplab.train.launch import RAY_TRAIN_DEFAULTS

    SETTINGS["cliplab defaults"] = dict(RAY_TRAIN_DEFAULTS)
    fits: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            run = subprocess.run([sys.executable, __file__, "--child", "--trainers", str(args.trainers)],
                                 env={**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"},
                                 capture_output=True, text=True, timeout=900)
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name}: the child failed:\n{run.stderr[-3000:]}")
            got = json.loads(line[len("RESULT "):])["fits"]
            print(f"{name}: fits {', '.join(f'{f:.1f}' for f in got)} s", flush=True)
            fits[name] += got[1:]
    print("\n| setting | fits (after each process's first) | median fit s |\n| --- | --- | --- |")
    for name, values in fits.items():
        print(f"| {name} | {len(values)} | {statistics.median(values):.2f} |")
    base, ours = (statistics.median(fits[n]) for n in SETTINGS)
    print(f"\ncliplab defaults / Ray defaults: {ours / base:.2f}")


if __name__ == "__main__":
    main()
