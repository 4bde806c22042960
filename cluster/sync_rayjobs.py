"""Copy the RayCluster's spec (cluster/base/raycluster.yaml) into the RayJobs' rayClusterSpec.

    python cluster/sync_rayjobs.py          # rewrite cluster/base/jobs/rayjob-*.yaml below their header
    python cluster/sync_rayjobs.py --check  # exit 1 if a RayJob's cluster differs (what the tests check)

A RayJob brings its own cluster, whose spec YAML cannot share with another file, so the job files
hold a copy: everything from their `  rayClusterSpec:` line on is written by this script; the lines
above it (the job's own fields and comments) are kept as they are. The overlays patch the RayCluster
and the RayJobs with the same operations one level apart (`/spec/...`, `/spec/rayClusterSpec/...`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MARK = "  rayClusterSpec:\n"


def render(job_text: str, cluster_spec: dict) -> str:
    head = job_text[: job_text.index(MARK)] if MARK in job_text else job_text.rstrip("\n") + "\n"
    body = yaml.safe_dump(cluster_spec, sort_keys=False, default_flow_style=False, width=120)
    return head + MARK + "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())


def main(argv: list[str]) -> int:
    spec = yaml.safe_load((HERE / "base" / "raycluster.yaml").read_text())["spec"]
    stale = []
    for path in sorted((HERE / "base" / "jobs").glob("rayjob-*.yaml")):
        text = path.read_text()
        new = render(text, spec)
        if new != text:
            stale.append(path)
            if "--check" not in argv:
                path.write_text(new)
    if "--check" in argv and stale:
        print("rayClusterSpec out of date in: " + ", ".join(str(p) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
