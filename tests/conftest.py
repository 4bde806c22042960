"""Real local services for integration tests: SeaweedFS S3, an mlflow server and a Ray head,
each started on free ports by the same code the CLI and demo use, and stopped afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_TELEMETRY_DISABLED", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is first imported; local clusters use tokens

REPO = Path(__file__).resolve().parents[1]
EMOJI_LIMIT = 400  # a slice of the corpus keeps integration tests quick


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from cliplab.services import S3Service

    with S3Service(tmp_path_factory.mktemp("s3"), buckets=("cliplab",)) as svc:
        yield svc


# CLIPLAB_TEST_MLFLOW_BACKEND=postgres: the `mlflow_server` fixture stores in Postgres, not sqlite, and
# only the tests that use it run (the Makefile's `test` runs tests/test_tracking.py so once more)
MLFLOW_BACKENDS = ("sqlite", "postgres")
MLFLOW_BACKEND = os.environ.get("CLIPLAB_TEST_MLFLOW_BACKEND", "sqlite")


def pytest_configure(config):
    if MLFLOW_BACKEND not in MLFLOW_BACKENDS:
        raise pytest.UsageError(f"CLIPLAB_TEST_MLFLOW_BACKEND={MLFLOW_BACKEND!r}: use one of {', '.join(MLFLOW_BACKENDS)}")


def pytest_report_header(config):
    return f"mlflow_server fixture backend: {MLFLOW_BACKEND} (CLIPLAB_TEST_MLFLOW_BACKEND)"


def pytest_collection_modifyitems(config, items):
    if MLFLOW_BACKEND == "sqlite":
        return
    keep = [item for item in items if "mlflow_server" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A throwaway Postgres cluster (fsync off). Under root it runs as the `postgres` user, which
    cannot enter pytest's private (0700) temp folders, so its root is then a folder of its own."""
    import shutil
    import tempfile

    from cliplab.services import PostgresService

    if os.geteuid() == 0:
        root = Path(tempfile.mkdtemp(prefix="cliplab-postgres-"))
        root.chmod(0o711)
    else:
        root = tmp_path_factory.mktemp("postgres")
    try:
        with PostgresService(root / "pg", durable=False) as svc:
            yield svc
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_mlflow_server(tmp_path_factory, postgres_server):
    from cliplab.services import MlflowService

    with MlflowService(tmp_path_factory.mktemp("mlflow-postgres"), backend_store_uri=postgres_server.uri) as svc:
        yield svc


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory):
    from cliplab.services import MlflowService

    if MLFLOW_BACKEND == "postgres":
        yield request.getfixturevalue("postgres_mlflow_server")
        return
    with MlflowService(tmp_path_factory.mktemp("mlflow")) as svc:
        yield svc


@pytest.fixture(scope="session")
def emoji_corpus(tmp_path_factory):
    from cliplab.data.emoji import build_emoji_corpus

    out = tmp_path_factory.mktemp("emoji")
    stats = build_emoji_corpus(out, limit=EMOJI_LIMIT, image_px=64, samples_per_shard=100, progress=False)
    return out, stats


@pytest.fixture(scope="session")
def emoji_on_s3(s3_server, emoji_corpus):
    """The corpus slice uploaded to s3://cliplab/emoji/, with S3 credentials in os.environ
    (as a user's shell or a Kubernetes Secret would set them)."""
    from cliplab.config import S3Config
    from cliplab.data.sources import upload

    os.environ.update(s3_server.env())
    upload(emoji_corpus[0], "s3://cliplab/emoji", S3Config(endpoint_url=s3_server.endpoint))
    return "s3://cliplab/emoji"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, emoji_on_s3):
    """A Ray head started after the S3 credentials are in the environment, and a driver on it."""
    import ray

    from cliplab.services import RayService

    with RayService(tmp_path_factory.mktemp("ray"), num_cpus=2) as svc:
        os.environ.update(svc.env())
        ray.init(address=svc.address, logging_level="WARNING")
        try:
            yield svc
        finally:
            ray.shutdown()


def experiment(tmp_path: Path, s3_server, mlflow_server, **overrides):
    """The demo's base config pointed at the test services, with overrides."""
    from cliplab.config import ExperimentConfig, with_overrides

    values = {
        "name": "test",
        "storage_path": str(tmp_path / "runs"),
        "data.train": "s3://cliplab/emoji/train/",
        "data.val": "s3://cliplab/emoji/val/",
        "data.s3.endpoint_url": s3_server.endpoint,
        "data.batch_size": 16,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "tracking.uri": mlflow_server.uri,
        "tracking.experiment": "tests",
        "eval.templates": ["an emoji of {}."],
        **overrides,
    }
    return with_overrides(ExperimentConfig(), values)
