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


def test_demo_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_"))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "demo", "--quick", "--workdir",
                           str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    elapsed = time.perf_counter() - t0
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| trial_")]
    assert len(rows) == 2 and all("| clip " in r for r in rows)
    assert re.search(r"registered: cliplab-demo version \d+, alias 'champion'", out)
    assert re.search(r"MLflow UI: +http://127\.0\.0\.1:\d+", out)
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+", out)
    assert (tmp_path / "demo" / "data" / "emoji" / "stats.json").is_file()
    # the target is 3 minutes on an idle 2-core machine (146 s measured); speed is a benchmark's job,
    # so this bound only catches a run that is far off, not a busy CI neighbour
    assert elapsed < 300, f"demo --quick took {elapsed:.0f} s"
