"""The main job end to end: `cliplab demo --quick` on fresh embedded services."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.mlflow]

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)  # a hang guard, far above the ~5 min it takes; not a speed check
def test_demo_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "demo", "--quick", "--workdir",
                           str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    elapsed = time.perf_counter() - t0
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| trial_")]
    # one row per objective, each trained and evaluated (X-CLR on the captions embedded by the demo)
    objectives = [r.split("|")[2].strip() for r in rows]
    assert sorted(objectives) == ["clip", "cloob", "meru", "siglip", "xclr"], out[-3000:]
    assert re.search(r"caption embeddings \(X-CLR\): \d+ train captions", out)
    assert re.search(r"registered: cliplab-demo version \d+, alias 'champion'", out)
    # the eval stage: the champion on Fashion-MNIST, emoji groups and val retrieval
    assert re.search(r"\| objective \| Fashion-MNIST zero-shot top-1 \| emoji groups zero-shot top-1 \|", out)
    assert re.search(r"\| (clip|siglip|cloob|meru|xclr) +\| 0\.\d{3} +\| 0\.\d{3} +\| 0\.\d{3}", out), out[-3000:]
    assert re.search(r"MLflow UI: +http://127\.0\.0\.1:\d+", out)
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+", out)
    assert (tmp_path / "demo" / "data" / "emoji" / "stats.json").is_file()
    # speed is a benchmark's job (docs/PERFORMANCE.md): the wall time is printed, never asserted
    print(f"demo --quick took {elapsed:.0f} s")
