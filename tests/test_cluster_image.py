"""`make image-check` (cluster/image_check.py), the lock files (cluster/lock.py) and the digest pinning
(cluster/pin-digests.sh): issue 15 item 8. Static, like the check itself: Docker does not run here."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def image_check():
    return _module("image_check")


@pytest.fixture
def cluster_copy(tmp_path):
    """cluster/ with only the files the check reads, to break one at a time."""
    root = tmp_path / "repo"
    dst = root / "cluster"
    shutil.copytree(CLUSTER / "overlays", dst / "overlays")
    for name in ("Dockerfile", "README.md", "requirements.lock", "requirements-cpu.lock"):
        shutil.copy(CLUSTER / name, dst / name)
    return dst


def test_the_image_matches_the_readme_driver_range(image_check):
    problems, facts = image_check.check()
    assert problems == []
    assert any(f.startswith("torch: CUDA") for f in facts)
    assert any("the Ray base image: CUDA" in f for f in facts)
    assert any(f.startswith("cluster/README.md: NVIDIA driver >= ") for f in facts)


def test_make_image_check_target():
    text = (REPO / "Makefile").read_text()
    assert "image-check:" in text and "cluster/image_check.py" in text
    out = subprocess.run([sys.executable, str(CLUSTER / "image_check.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "image-check: ok" in out.stdout


def test_a_readme_below_the_cuda_minimum_fails(image_check, cluster_copy):
    readme = cluster_copy / "README.md"
    readme.write_text(readme.read_text().replace("NVIDIA driver >= 580.65.06", "NVIDIA driver >= 550.54.14"))
    problems, _ = image_check.check(cluster_copy)
    assert any("the image needs >= 580.65.06" in p for p in problems), problems


def test_a_newer_torch_cuda_needs_a_newer_driver(image_check, cluster_copy):
    lock = cluster_copy / "requirements.lock"
    text = lock.read_text()
    version = next(line for line in text.splitlines() if line.startswith("cuda-toolkit==")).split("==")[1]
    lock.write_text(text.replace(f"cuda-toolkit=={version}", "cuda-toolkit==13.9.0"))
    problems, _ = image_check.check(cluster_copy)
    assert any("CUDA 13.9" in p and "MIN_DRIVER" in p for p in problems), problems


def test_the_cpu_lock_has_no_cuda_build(image_check, cluster_copy):
    docker = cluster_copy / "Dockerfile"
    docker.write_text(docker.read_text().replace("ARG LOCK=cluster/requirements.lock", "ARG LOCK=cluster/requirements-cpu.lock"))
    problems, _ = image_check.check(cluster_copy)
    assert any("not a CUDA build" in p for p in problems), problems


def test_a_dockerfile_that_resolves_its_own_versions_fails(image_check, cluster_copy):
    docker = cluster_copy / "Dockerfile"
    docker.write_text(docker.read_text().replace("RUN pip install --no-deps -r ${LOCK}", "RUN pip install torch"))
    problems, _ = image_check.check(cluster_copy)
    assert any("does not install from a lock file" in p for p in problems), problems


def test_release_mode_refuses_placeholder_digests(image_check, cluster_copy):
    problems, _ = image_check.check(cluster_copy, release=True)
    assert any("placeholder digest" in p for p in problems)
    kust = cluster_copy / "overlays" / "h100-x8" / "kustomization.yaml"
    kust.write_text(kust.read_text().replace("digest: sha256:" + "0" * 64, "digest: sha256:abc", 1))
    problems, _ = image_check.check(cluster_copy)
    assert any("sha256:abc is not sha256:<64 hex>" in p for p in problems)


def test_pin_digests_writes_the_resolved_digests(tmp_path):
    """cluster/pin-digests.sh with a stand-in registry lookup (RESOLVE): every placeholder replaced by
    the digest of its name:tag, and --check passes afterwards."""
    dst = tmp_path / "cluster"
    shutil.copytree(CLUSTER / "overlays", dst / "overlays")
    shutil.copy(CLUSTER / "pin-digests.sh", dst / "pin-digests.sh")
    resolver = tmp_path / "resolve"
    resolver.write_text('#!/bin/sh\nprintf "sha256:%s\\n" "$(printf %s "$1" | sha256sum | cut -c1-64)"\n')
    resolver.chmod(0o755)
    env = {**os.environ, "RESOLVE": str(resolver)}
    check = subprocess.run(["bash", str(dst / "pin-digests.sh"), "--check"], capture_output=True, text=True, env=env)
    assert check.returncode == 1 and "placeholder digests left" in check.stdout
    out = subprocess.run(["bash", str(dst / "pin-digests.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "registry.example.com/ml/cliplab:0.1.0@sha256:" in out.stdout
    text = (dst / "overlays" / "h100-x8" / "kustomization.yaml").read_text()
    assert "0" * 64 not in text
    import hashlib

    want = hashlib.sha256(b"fluent/fluent-bit:3.2.2").hexdigest()
    assert f"digest: sha256:{want}" in text
    again = subprocess.run(["bash", str(dst / "pin-digests.sh"), "--check"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stdout


def test_the_locks_pin_what_pyproject_pins():
    """The lock is the closure cluster/lock.py read from the tested environment: the packages the
    project pins itself are at those versions, and the CPU lock swaps in the +cpu wheels only."""
    import re

    import tomllib

    lock = _module("image_check").lock_pins((CLUSTER / "requirements.lock").read_text())
    cpu = _module("image_check").lock_pins((CLUSTER / "requirements-cpu.lock").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", dep)
        if m:
            name = m.group(1).lower().replace("_", "-")
            assert lock[name] == m.group(3), name
            assert cpu[name].split("+")[0] == m.group(3), name
    assert cpu["torch"].endswith("+cpu") and not [n for n in cpu if n.startswith(("nvidia-", "cuda-"))]
    assert "cliplab" not in lock  # installed from the source, after the lock


def test_lock_script_reads_the_installed_closure():
    out = subprocess.run([sys.executable, str(CLUSTER / "lock.py"), "mlflow", "--add", "psycopg2-binary==2.9.13"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pins = _module("image_check").lock_pins(out.stdout)
    from importlib import metadata

    assert pins["mlflow"] == metadata.version("mlflow")
    assert pins["sqlalchemy"] == metadata.version("sqlalchemy")  # a dependency of a dependency
    assert pins["psycopg2-binary"] == "2.9.13"
    assert "torch" not in pins
