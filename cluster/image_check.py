"""`make image-check`: the image's CUDA build against the driver range cluster/README.md states, and
the overlays' images pinned by digest. A static check (Docker does not run where the tests do): it
reads the lock file, the Dockerfile, the README and the overlays, builds nothing.

- torch in cluster/requirements.lock is PyPI's Linux wheel; its CUDA runtime is the cuda-toolkit pin
  the lock carries. The Ray base image's tag (RAY_TAG=...-cuXYZ) names the CUDA of the base.
- Each CUDA release needs a minimum Linux driver (NVIDIA's CUDA Toolkit release notes, "CUDA Toolkit
  and Corresponding Driver Versions"). The README's "NVIDIA driver >= X" must be at least the larger
  of the two, or pods start on nodes whose driver cannot run the image.
- The Dockerfile installs from the lock; every overlay image is name[:tag]@sha256:<64 hex>. With
  --release the all-zero placeholder digests fail too (run cluster/pin-digests.sh first).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent
PLACEHOLDER = "sha256:" + "0" * 64
# minimum Linux x86_64 driver of each CUDA toolkit release (its GA "toolkit driver version")
MIN_DRIVER = {
    (12, 0): "525.60.13", (12, 1): "530.30.02", (12, 2): "535.54.03", (12, 3): "545.23.06",
    (12, 4): "550.54.14", (12, 5): "555.42.02", (12, 6): "560.28.03", (12, 8): "570.26",
    (12, 9): "575.51.03", (13, 0): "580.65.06",
}
DRIVER_STATEMENT = re.compile(r"NVIDIA driver >= (\d+(?:\.\d+)+)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def lock_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def check(cluster: Path = CLUSTER, *, release: bool = False) -> tuple[list[str], list[str]]:
    """(problems, facts) for the files under ``cluster``."""
    problems, facts = [], []
    dockerfile = (cluster / "Dockerfile").read_text()
    lock_name = re.search(r"^ARG LOCK=(\S+)", dockerfile, re.M)
    if not lock_name or not re.search(r"pip install [^\n]*--no-deps [^\n]*-r \$\{LOCK\}", dockerfile):
        problems.append("cluster/Dockerfile does not install from a lock file (ARG LOCK=... and "
                        "pip install --no-deps -r ${LOCK})")
        return problems, facts
    lock_path = cluster.parent / lock_name.group(1)
    if not lock_path.is_file():
        problems.append(f"{lock_name.group(1)}: the Dockerfile's lock file does not exist")
        return problems, facts
    pins = lock_pins(lock_path.read_text())
    cudas: dict[str, tuple[int, int]] = {}
    if "torch" not in pins:
        problems.append(f"{lock_path.name} pins no torch")
    elif "+" in pins["torch"] and not pins["torch"].split("+")[1].startswith("cu"):
        problems.append(f"{lock_path.name} pins torch {pins['torch']}: not a CUDA build")
    elif "+cu" in pins["torch"]:
        tag = pins["torch"].split("+cu")[1]
        cudas["torch"] = (int(tag[:-1]), int(tag[-1]))
    elif "cuda-toolkit" in pins:
        major, minor = _version(pins["cuda-toolkit"])[:2]
        cudas["torch"] = (major, minor)
    else:
        problems.append(f"{lock_path.name}: torch {pins['torch']} without a cuda-toolkit pin: its CUDA is unknown")
    tag = re.search(r"^ARG RAY_TAG=\S*-cu(\d+)(\d)\b", dockerfile, re.M)
    if tag:
        cudas["the Ray base image"] = (int(tag.group(1)), int(tag.group(2)))
    else:
        problems.append("cluster/Dockerfile: RAY_TAG names no CUDA build (-cuXYZ)")
    need = None
    for what, cuda in cudas.items():
        if cuda not in MIN_DRIVER:
            problems.append(f"CUDA {cuda[0]}.{cuda[1]} ({what}) is not in image_check.MIN_DRIVER: add its minimum "
                            "driver from NVIDIA's CUDA Toolkit release notes")
            continue
        facts.append(f"{what}: CUDA {cuda[0]}.{cuda[1]}, needs NVIDIA driver >= {MIN_DRIVER[cuda]}")
        if need is None or _version(MIN_DRIVER[cuda]) > _version(need):
            need = MIN_DRIVER[cuda]
    stated = sorted(set(DRIVER_STATEMENT.findall((cluster / "README.md").read_text())), key=_version)
    if not stated:
        problems.append("cluster/README.md states no driver range ('NVIDIA driver >= X')")
    elif need is not None:
        if len(stated) > 1:
            problems.append(f"cluster/README.md states different driver minimums: {', '.join(stated)}")
        if _version(stated[0]) < _version(need):
            problems.append(f"cluster/README.md says NVIDIA driver >= {stated[0]}, but the image needs >= {need}")
        else:
            facts.append(f"cluster/README.md: NVIDIA driver >= {stated[-1]} (the image needs >= {need})")
    for path in sorted((cluster / "overlays").rglob("kustomization.yaml")):
        text = path.read_text()
        names = re.findall(r"^  - name: (\S+)", text, re.M)
        digests = re.findall(r"^    digest: (\S+)", text, re.M)
        rel = path.relative_to(cluster.parent)
        if not names or len(digests) != len(names):
            problems.append(f"{rel}: every entry under images: needs a digest ({len(digests)} of {len(names)})")
        for digest in digests:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{rel}: {digest} is not sha256:<64 hex>")
            elif release and digest == PLACEHOLDER:
                problems.append(f"{rel}: placeholder digest left; run cluster/pin-digests.sh after pushing")
    return problems, facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", action="store_true", help="fail on placeholder digests too")
    args = p.parse_args(argv)
    problems, facts = check(release=args.release)
    for fact in facts:
        print(f"image-check: {fact}")
    for problem in problems:
        print(f"image-check: FAIL {problem}", file=sys.stderr)
    if not problems:
        print("image-check: ok (static: the lock, the Dockerfile, the README and the overlays were read; "
              "no image was built or run)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
