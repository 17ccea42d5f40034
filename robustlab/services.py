"""Shared infrastructure for many workers: one PostgreSQL and one MLflow server, started locally.

`robustlab services start` (`make services`) starts, idempotently:

- PostgreSQL (Debian's `postgresql` binaries; `initdb`/`pg_ctl` run as the `postgres` user when
  we are root) with its data under `tracking/services/pg`, listening on 127.0.0.1 only, password
  authentication over TCP for the role `robustlab`, and two databases: `mlflow` and `optuna`;
- an MLflow tracking server on the `mlflow` database (schema upgraded with `mlflow db upgrade`),
  serving artifacts from `tracking/services/artifacts` (`--artifacts-destination`), bound to
  127.0.0.1 with `--allowed-hosts`, its background job runner off.

It writes `tracking/services.env` (`MLFLOW_TRACKING_URI=…`, `ROBUSTLAB_OPTUNA_STORAGE=…`) for
workers to source. `robustlab services stop` stops both; `status` reports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from robustlab.errors import RobustlabError
from robustlab.tracking import tracking_dir

PG_PORT_ENV = "ROBUSTLAB_PG_PORT"
MLFLOW_PORT_ENV = "ROBUSTLAB_SERVICES_PORT"
PASSWORD_ENV = "ROBUSTLAB_PG_PASSWORD"
DATABASES = ("mlflow", "optuna")
ROLE = "robustlab"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Services:
    """Where the services live and listen."""

    root: Path
    pg_port: int = 5433
    mlflow_port: int = 5001

    @classmethod
    def from_env(cls) -> Services:
        ports = {}
        for env, default in ((PG_PORT_ENV, 5433), (MLFLOW_PORT_ENV, 5001)):
            text = os.environ.get(env) or str(default)
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise RobustlabError(f"{env}={text!r} is not a port number; use 1..65535")
            ports[env] = int(text)
        return cls(tracking_dir() / "services", ports[PG_PORT_ENV], ports[MLFLOW_PORT_ENV])

    @cached_property
    def pg_root(self) -> Path:
        """`tracking/services/pg`, or, when we are root and the `postgres` user cannot reach
        that folder (e.g. a checkout under a private home), a folder of its own under
        /var/lib/postgresql named after this checkout."""
        here = self.root / "pg"
        if os.geteuid() != 0 or _postgres_can_reach(self.root):
            return here
        digest = hashlib.sha256(str(here).encode()).hexdigest()[:12]
        return Path("/var/lib/postgresql/robustlab") / digest

    @property
    def pgdata(self) -> Path:
        return self.pg_root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.pg_root / "sock"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def env_file(self) -> Path:
        return self.root.parent / "services.env"

    @property
    def pid_file(self) -> Path:
        return self.root / "mlflow.pid"

    def password(self) -> str:
        """$ROBUSTLAB_PG_PASSWORD, else one generated on first start and kept (mode 600)."""
        if os.environ.get(PASSWORD_ENV):
            return os.environ[PASSWORD_ENV]
        path = self.root / "pg_password"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_secret(path, secrets.token_urlsafe(18))
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            text, why = "", f"{type(exc).__name__}: {exc.strerror or exc}"
        else:
            why = "it is empty"
        if not text:
            raise RobustlabError(
                f"cannot read the PostgreSQL password from {path} ({why}); make it a file of "
                f"yours with mode 600 holding the password, or set ${PASSWORD_ENV}"
            )
        return text

    def db_url(self, db: str) -> str:
        """The database's URL with its password (for the mode-600 services.env only)."""
        return f"postgresql+psycopg://{ROLE}:{self.password()}@{HOST}:{self.pg_port}/{db}"

    def db_url_without_password(self, db: str) -> str:
        """The URL for command lines: libpq takes the password from $PGPASSWORD instead."""
        return f"postgresql+psycopg://{ROLE}@{HOST}:{self.pg_port}/{db}"

    def password_env(self) -> dict[str, str]:
        """The environment that hands the password to libpq (never a command line)."""
        return {**os.environ, "PGPASSWORD": self.password()}

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"


def _pg_bin(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found:
        return found
    raise RobustlabError(
        f"PostgreSQL's {name} was not found; install it (apt-get install postgresql) and retry"
    )


def _postgres_can_reach(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    probe = ["runuser", "-u", "postgres", "--", "test", "-x", str(folder)]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run as the `postgres` user when root (initdb refuses root), else as ourselves."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def write_secret(path: Path, text: str) -> None:
    """Write `text` to a new file readable by its owner only (mode 600 from its creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _run(
    cmd: list[str], what: str, *, stdin: str | None = None, env: dict[str, str] | None = None
) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, input=stdin, env=env)
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise RobustlabError(f"{what} failed: {detail[-1] if detail else out.returncode}")
    return out.stdout


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _pg_running(svc: Services) -> bool:
    if not (svc.pgdata / "PG_VERSION").is_file():
        return False
    cmd = _as_postgres([_pg_bin("pg_ctl"), "-D", str(svc.pgdata), "status"])
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _chown_postgres(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            shutil.chown(p, "postgres", "postgres")


def start_postgres(svc: Services) -> None:
    """initdb on first use, then start on 127.0.0.1:pg_port (reused if already running)."""
    if _pg_running(svc):
        return
    if _port_open(svc.pg_port):
        raise RobustlabError(
            f"port {svc.pg_port} is taken by another program; stop it or choose another port "
            f"with {PG_PORT_ENV}=N"
        )
    if not (svc.pgdata / "PG_VERSION").is_file():
        svc.pgdata.mkdir(parents=True, exist_ok=True)
        svc.pgdata.chmod(0o700)
        _chown_postgres(svc.pgdata)
        pwfile = svc.pg_root / "pwfile"
        try:  # mode 600 from its creation, removed whatever initdb does
            write_secret(pwfile, svc.password() + "\n")
            _chown_postgres(pwfile)
            _run(
                _as_postgres(
                    [
                        _pg_bin("initdb"),
                        "-D",
                        str(svc.pgdata),
                        "-U",
                        "postgres",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        f"--pwfile={pwfile}",
                    ]
                ),
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
    svc.socket_dir.mkdir(parents=True, exist_ok=True)
    _chown_postgres(svc.socket_dir, svc.pg_root)
    opts = f"-p {svc.pg_port} -k {svc.socket_dir} -c listen_addresses={HOST}"
    _run(
        _as_postgres(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(svc.pgdata),
                "-o",
                opts,
                "-l",
                str(svc.pg_root / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        f"starting PostgreSQL (see {svc.pg_root / 'postgres.log'})",
    )
    _ensure_databases(svc)


def _psql(svc: Services, sql: str, db: str = "postgres") -> str:
    """Run `sql` through psql's standard input (a password in it never reaches a command line)."""
    cmd = [_pg_bin("psql"), "-h", str(svc.socket_dir), "-p", str(svc.pg_port), "-U", "postgres"]
    cmd += ["-d", db, "-v", "ON_ERROR_STOP=1", "-tA", "-f", "-"]
    return _run(_as_postgres(cmd), "psql", stdin=sql)


def _ensure_databases(svc: Services) -> None:
    pw = svc.password().replace("'", "''")
    if not _psql(svc, f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'").strip():
        _psql(svc, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{pw}'")
    else:
        _psql(svc, f"ALTER ROLE {ROLE} PASSWORD '{pw}'")
    for db in DATABASES:
        if not _psql(svc, f"SELECT 1 FROM pg_database WHERE datname = '{db}'").strip():
            _psql(svc, f"CREATE DATABASE {db} OWNER {ROLE}")


def restart_postgres(svc: Services) -> None:
    """`pg_ctl restart` (fast mode: open connections are cut, as after a crash or a failover)."""
    opts = f"-p {svc.pg_port} -k {svc.socket_dir} -c listen_addresses={HOST}"
    _run(
        _as_postgres(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(svc.pgdata),
                "-o",
                opts,
                "-l",
                str(svc.pg_root / "postgres.log"),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ]
        ),
        "restarting PostgreSQL",
    )


def stop_postgres(svc: Services) -> bool:
    if not _pg_running(svc):
        return False
    _run(
        _as_postgres([_pg_bin("pg_ctl"), "-D", str(svc.pgdata), "-m", "fast", "-w", "stop"]),
        "stopping PostgreSQL",
    )
    return True


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _server_pid(svc: Services) -> int | None:
    try:
        pid = int(svc.pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start_mlflow(svc: Services, timeout: float = 90.0) -> None:
    """`mlflow server` on the `mlflow` database (reused when ours already answers)."""
    if _server_pid(svc) and _healthy(svc.tracking_uri):
        return
    if _port_open(svc.mlflow_port):
        raise RobustlabError(
            f"port {svc.mlflow_port} is taken by another program; stop it or choose another port "
            f"with {MLFLOW_PORT_ENV}=N"
        )
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    db = svc.db_url_without_password("mlflow")  # the password travels in $PGPASSWORD
    _run([mlflow_bin, "db", "upgrade", db], "mlflow db upgrade", env=svc.password_env())
    svc.artifacts.mkdir(parents=True, exist_ok=True)
    hosts = f"{HOST}:{svc.mlflow_port},localhost:{svc.mlflow_port}"
    env = {**svc.password_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(svc.root / "mlflow.log", "ab")  # noqa: SIM115 - handed to the server process
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--backend-store-uri",
            db,
            "--artifacts-destination",
            str(svc.artifacts),
            "--host",
            HOST,
            "--port",
            str(svc.mlflow_port),
            "--allowed-hosts",
            hosts,
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    svc.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(svc.tracking_uri):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    stop_mlflow(svc)
    raise RobustlabError(
        f"the MLflow server did not come up on {svc.tracking_uri}; see {svc.root / 'mlflow.log'}"
    )


def stop_mlflow(svc: Services) -> bool:
    pid = _server_pid(svc)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    svc.pid_file.unlink(missing_ok=True)
    return True


def write_env(svc: Services) -> dict[str, str]:
    values = {
        "MLFLOW_TRACKING_URI": svc.tracking_uri,
        "ROBUSTLAB_OPTUNA_STORAGE": svc.db_url("optuna"),
    }
    write_secret(svc.env_file, "".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def start(svc: Services | None = None) -> dict[str, str]:
    """Start (or reuse) PostgreSQL and the MLflow server; return the two URLs."""
    svc = svc or Services.from_env()
    svc.root.mkdir(parents=True, exist_ok=True)
    svc.password()  # an unreadable password file: one line before anything starts
    start_postgres(svc)
    start_mlflow(svc)
    return write_env(svc)


def stop(svc: Services | None = None) -> list[str]:
    svc = svc or Services.from_env()
    stopped = []
    if stop_mlflow(svc):
        stopped.append("mlflow server")
    if stop_postgres(svc):
        stopped.append("postgresql")
    return stopped


def status(svc: Services | None = None) -> dict[str, bool]:
    svc = svc or Services.from_env()
    return {
        "postgresql": _pg_running(svc),
        "mlflow server": bool(_server_pid(svc)) and _healthy(svc.tracking_uri),
    }
