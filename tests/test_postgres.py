"""MLflow on Postgres: a PostgresService (Debian's postgresql, initdb'd into a throwaway root) as
the backend store of a real mlflow server, checked by reading Postgres's own tables."""

import os
import stat
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import MLFLOW_BACKEND

pytestmark = [pytest.mark.mlflow, pytest.mark.postgres]


def _uid(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    return int(line.split()[1])


def test_an_mlflow_server_on_postgres_keeps_its_runs_in_postgres(postgres_server, postgres_mlflow_server):
    client = MlflowClient(postgres_mlflow_server.uri)
    exp_id = client.create_experiment(f"pg-{time.time_ns()}")
    run_id = client.create_run(exp_id, run_name="stored-in-postgres").info.run_id
    client.log_param(run_id, "optim.lr", "0.001")
    for step in range(3):
        client.log_metric(run_id, "train/loss", 3.0 - step, step=step)
    client.set_terminated(run_id)

    with postgres_server.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT r.name, r.status, e.name FROM runs r JOIN experiments e USING (experiment_id) "
                    "WHERE r.run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("stored-in-postgres", "FINISHED", client.get_experiment(exp_id).name)
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'optim.lr'", (run_id,))
        assert cur.fetchall() == [("0.001",)]
        cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step",
                    (run_id,))
        assert cur.fetchall() == [(0, 3.0), (1, 2.0), (2, 1.0)]
    conn.close()
    assert not list(postgres_mlflow_server.root.glob("*.db")), "the server fell back to a sqlite file"
    cmdline = Path(f"/proc/{postgres_mlflow_server.proc.pid}/cmdline").read_bytes().decode()
    assert postgres_server.password not in cmdline, "the database password is on mlflow's command line"
    if os.geteuid() == 0:  # postgres refuses root: the server runs as the postgres system user
        import pwd

        assert _uid(postgres_server.proc.pid) == pwd.getpwnam("postgres").pw_uid


def test_the_mlflow_server_fixture_uses_the_backend_asked_for(mlflow_server):
    """CLIPLAB_TEST_MLFLOW_BACKEND=postgres (the Makefile's second tracking pass) really moves the
    fixture's store to Postgres; without it the store is the sqlite file."""
    if MLFLOW_BACKEND == "postgres":
        assert (mlflow_server.backend_store_uri or "").startswith("postgresql+psycopg2://")
        assert not list(mlflow_server.root.glob("*.db"))
    else:
        assert mlflow_server.backend_store_uri is None and (mlflow_server.root / "mlflow.db").is_file()


def test_postgres_service_says_what_to_do_when_it_cannot_start(tmp_path, monkeypatch):
    from cliplab.errors import ServiceError
    from cliplab.services import PostgresService

    monkeypatch.setenv("CLIPLAB_POSTGRES_BINDIR", str(tmp_path))
    with pytest.raises(ServiceError, match="has no initdb and postgres"):
        PostgresService(tmp_path / "pg")
    monkeypatch.delenv("CLIPLAB_POSTGRES_BINDIR")
    if os.geteuid() != 0:
        return
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    with pytest.raises(ServiceError, match=r"cannot reach .*private/pg: .* is not searchable by it \(mode 700\)"):
        PostgresService(private / "pg").start()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700, "the service changed a folder outside its root"


def test_the_documented_backend_store_uri_uses_a_driver_the_mlflow_image_installs():
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the image installs psycopg2 only, so
    such a URI in the cliplab-mlflow-server Secret stops mlflow at start ("No module named 'psycopg'")."""
    import re

    from sqlalchemy.engine.url import make_url

    cluster = Path(__file__).resolve().parents[1] / "cluster"
    uris = re.findall(r'backend-store-uri="([^"]+)"', (cluster / "README.md").read_text())
    pins = {ln.split("==")[0].strip().lower() for ln in (cluster / "mlflow-requirements.lock").read_text().splitlines()
            if "==" in ln and not ln.startswith("#")}
    packages = {"psycopg2": {"psycopg2", "psycopg2-binary"}, "psycopg": {"psycopg", "psycopg-binary"}}
    assert uris
    for uri in uris:
        driver = make_url(uri.replace("$PG_PASSWORD", "pw")).get_dialect().driver
        assert packages.get(driver, {driver}) & pins, f"{uri}: SQLAlchemy uses {driver}, not in the mlflow image"
