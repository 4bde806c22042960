"""A throwaway local PostgreSQL cluster (Debian's ``postgresql`` package), e.g. as MLflow's backend store.

``initdb`` puts the cluster in ``ROOT/data`` on the first start; the server listens on 127.0.0.1 only,
with its unix socket (and lock file) in ``ROOT/socket``, and every connection needs the password that
``ROOT/credentials`` keeps. PostgreSQL refuses to run as root: under root the cluster belongs to, and
the server runs as, the ``postgres`` system user (which the package creates).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from cliplab.errors import ServiceError
from cliplab.services.base import Service

_INSTALL = "install PostgreSQL's server: apt-get install postgresql (or set CLIPLAB_POSTGRES_BINDIR to its bin/)"


def postgres_bindir() -> Path:
    """The folder of ``initdb`` and ``postgres``: ``CLIPLAB_POSTGRES_BINDIR``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's layout), else the folder ``initdb`` on PATH links to."""
    def complete(d: Path) -> bool:
        return all((d / b).is_file() and os.access(d / b, os.X_OK) for b in ("initdb", "postgres"))

    if os.environ.get("CLIPLAB_POSTGRES_BINDIR"):
        d = Path(os.environ["CLIPLAB_POSTGRES_BINDIR"])
        if not complete(d):
            raise ServiceError(f"CLIPLAB_POSTGRES_BINDIR={d} has no initdb and postgres; point it at "
                               "PostgreSQL's bin/ (e.g. /usr/lib/postgresql/15/bin) or unset it")
        return d

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in d.parent.name.split(".") if p.isdigit())

    debian = sorted((d for d in Path("/usr/lib/postgresql").glob("*/bin") if complete(d)), key=version)
    if debian:
        return debian[-1]
    on_path = shutil.which("initdb")
    if on_path and complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    raise ServiceError(f"PostgreSQL's initdb and postgres were not found in /usr/lib/postgresql/*/bin or on PATH; "
                       f"{_INSTALL}")


class PostgresService(Service):
    """One superuser (``user``) and one database (``database``, created at the first start).

    ``uri`` is the SQLAlchemy URI (``postgresql+psycopg2://user:password@127.0.0.1:PORT/database``)
    that ``mlflow server --backend-store-uri`` takes; ``connect()`` opens a psycopg2 connection. The
    driver is named: SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, which is not installed
    (mlflow then exits with "No module named 'psycopg'").
    ``durable=False`` turns fsync off: quicker, and a machine crash may lose the cluster (tests).
    """

    name = "PostgreSQL"
    start_timeout_s = 60.0

    def __init__(self, root: Path, port: int | None = None, *, database: str = "mlflow", user: str = "cliplab",
                 durable: bool = True) -> None:
        super().__init__(root, port)
        self.database, self.user, self.durable = database, user, durable
        self.bindir = postgres_bindir()
        self._password: str | None = None

    # where things are ------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def password(self) -> str:
        """Made once per root and kept in ``ROOT/credentials`` (mode 0600), so a restart on the same
        root reaches the same cluster."""
        if self._password is None:
            creds = self.root / "credentials"
            if creds.is_file():
                self._password = creds.read_text().strip()
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                self._password = secrets.token_hex(16)
                creds.touch(mode=0o600)
                creds.write_text(self._password + "\n")
        return self._password

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def connect(self, database: str | None = None, timeout_s: int = 5):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database or self.database, connect_timeout=timeout_s)

    # who runs it -----------------------------------------------------------------------
    def _account(self) -> pwd.struct_passwd | None:
        """The ``postgres`` system user when we are root (PostgreSQL refuses root), else None: the
        cluster then belongs to the current user."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceError("PostgreSQL refuses to run as root and there is no 'postgres' system user to run it "
                               f"as; {_INSTALL}, or run as a non-root user") from None

    def popen_options(self) -> dict:
        account = self._account()
        if account is None:
            return {}
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _own(self, path: Path, mode: int) -> None:
        """``path`` (a folder) exists, belongs to the server's user and has ``mode``."""
        path.mkdir(parents=True, exist_ok=True)
        account = self._account()
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)
        path.chmod(mode)

    def _check_reachable(self, account: pwd.struct_passwd) -> None:
        """The ``postgres`` user must be able to walk down to ROOT; ROOT is made searchable for it."""
        st = self.root.stat()
        if st.st_uid != account.pw_uid and not st.st_mode & stat.S_IXOTH:
            self.root.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        probe = subprocess.run(["test", "-x", str(self.root)], **self.popen_options(), check=False)
        if probe.returncode == 0:
            return
        blocked = next((p for p in reversed(self.root.parents)
                        if p.stat().st_uid != account.pw_uid and not p.stat().st_mode & stat.S_IXOTH), self.root)
        raise ServiceError(f"{self.name} runs as the 'postgres' user (it refuses root), which cannot reach {self.root}: "
                           f"{blocked} is not searchable by it (mode {stat.S_IMODE(blocked.stat().st_mode):o}); "
                           "start it under a folder 'postgres' can enter, or run `chmod o+x` on that folder")

    # the service -----------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        # PGDATA, PGPORT, PGHOST... of the caller would otherwise steer initdb and the server
        return {k: v for k, v in super().environment().items() if not k.startswith("PG")}

    def _initdb(self) -> None:
        account = self._account()
        if account is not None:
            self._check_reachable(account)
        self._own(self.data_dir, 0o700)
        pwfile = self.root / "initdb-password"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        try:
            proc = subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                                   f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                                   "--no-sync", "--no-instructions"],
                                  cwd=self.data_dir, env=self.environment(), capture_output=True, text=True,
                                  timeout=120, check=False, **self.popen_options())
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.log_path, "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-made cluster would block the next try
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ServiceError(f"initdb failed (exit {proc.returncode}): {last} (log: {self.log_path})")

    def start(self) -> PostgresService:
        """``initdb`` on the first start of a root, then the server."""
        if self.proc is None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            self._own(self.socket_dir, 0o700)
        return super().start()

    def command(self) -> list[str]:
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.socket_dir}"]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return cmd

    def healthy(self) -> bool:
        try:
            self.connect("postgres", timeout_s=1).close()
        except Exception:  # refused, or "the database system is starting up"
            return False
        return True

    def check_ready(self) -> None:
        conn = self.connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """A fast shutdown (SIGINT: clients are disconnected, the cluster is left clean), then the
        process group's usual SIGTERM/SIGKILL for anything left."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=timeout_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        super().stop(timeout_s=1.0)

