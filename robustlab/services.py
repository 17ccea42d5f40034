"""Shared infrastructure for many workers: one PostgreSQL and one MLflow server, started locally.

`robustlab services start` (`make services`) starts, idempotently:

- PostgreSQL (Debian's `postgresql` binaries; `initdb`/`pg_ctl` run as the `postgres` user when
  we are root) with its data under `tracking/services/pg`. Who may connect: the superuser only
  through its 0700 socket, by peer authentication (it has no password); the role `robustlab`,
  by SCRAM password, only to its two databases `mlflow` and `optuna`, over loopback, and over
  the network only when the operator names an address ($ROBUSTLAB_SERVICES_HOST; then from
  the same subnet). The role's password is set as a SCRAM verifier with statement logging off,
  so neither it nor the verifier reaches postgres.log;
- an MLflow tracking server on the `mlflow` database (schema upgraded with `mlflow db upgrade`),
  serving artifacts from `tracking/services/artifacts` (`--artifacts-destination`), bound to
  127.0.0.1 (or the named address, then behind MLflow's basic-auth app) with `--allowed-hosts`,
  its background job runner off.

It writes `tracking/services.env` (mode 600: `MLFLOW_TRACKING_URI=…`, `ROBUSTLAB_OPTUNA_STORAGE=…`
and, with authentication, `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`) for workers to
source. `robustlab services stop` stops both; `status` reports them.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import hmac
import ipaddress
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
from urllib.parse import quote

from robustlab.errors import RobustlabError
from robustlab.tracking import tracking_dir

PG_PORT_ENV = "ROBUSTLAB_PG_PORT"
MLFLOW_PORT_ENV = "ROBUSTLAB_SERVICES_PORT"
PASSWORD_ENV = "ROBUSTLAB_PG_PASSWORD"
HOST_ENV = "ROBUSTLAB_SERVICES_HOST"  # an address beyond loopback to listen on (default none)
DATABASES = ("mlflow", "optuna")
ROLE = "robustlab"
HOST = "127.0.0.1"
MLFLOW_USER = "robustlab"


@dataclass(frozen=True)
class Services:
    """Where the services live and listen."""

    root: Path
    pg_port: int = 5433
    mlflow_port: int = 5001
    host: str = HOST  # where both listen besides loopback; clients connect to it

    @property
    def public(self) -> bool:
        """Whether the services listen beyond loopback (then MLflow requires a login)."""
        return not ipaddress.ip_address(self.host).is_loopback

    @classmethod
    def from_env(cls) -> Services:
        ports = {}
        for env, default in ((PG_PORT_ENV, 5433), (MLFLOW_PORT_ENV, 5001)):
            text = os.environ.get(env) or str(default)
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise RobustlabError(f"{env}={text!r} is not a port number; use 1..65535")
            ports[env] = int(text)
        host = os.environ.get(HOST_ENV) or HOST
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise RobustlabError(
                f"{HOST_ENV}={host!r} is not an IP address; name one of this machine's addresses"
            ) from None
        return cls(tracking_dir() / "services", ports[PG_PORT_ENV], ports[MLFLOW_PORT_ENV], host)

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
        return self.secret("pg_password", "PostgreSQL password", PASSWORD_ENV)

    def mlflow_password(self) -> str:
        """The MLflow login of the workers (the auth app's admin), generated and kept."""
        return self.secret("mlflow_password", "MLflow password", "MLFLOW_TRACKING_PASSWORD")

    def secret(self, name: str, what: str, env: str | None = None) -> str:
        """The secret kept in `name` under the services folder (mode 600), made on first use."""
        path = self.root / name
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
                f"cannot read the {what} from {path} ({why}); make it a file of yours "
                f"with mode 600 holding it" + (f", or set ${env}" if env else "")
            )
        return text

    @property
    def connect_host(self) -> str:
        """The address clients use: the named one, or loopback."""
        return HOST if self.host in ("0.0.0.0", "::") else self.host

    def db_url(self, db: str) -> str:
        """The database's URL with its password (for the mode-600 services.env only)."""
        pw = quote(self.password(), safe="")
        return f"postgresql+psycopg://{ROLE}:{pw}@{self.connect_host}:{self.pg_port}/{db}"

    def db_url_without_password(self, db: str) -> str:
        """The URL for command lines: libpq takes the password from $PGPASSWORD instead."""
        return f"postgresql+psycopg://{ROLE}@{HOST}:{self.pg_port}/{db}"

    @property
    def superuser(self) -> str:
        """The cluster's superuser: the OS user initdb runs as (peer authentication)."""
        return "postgres" if os.geteuid() == 0 else getpass.getuser()

    def password_env(self) -> dict[str, str]:
        """The environment that hands the password to libpq (never a command line)."""
        return {**os.environ, "PGPASSWORD": self.password()}

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.connect_host}:{self.mlflow_port}"


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
    """Write `text` to a new file readable by its owner only: created here (never through a
    link or into a file someone else made) with mode 600 from its creation; an existing file
    of ours is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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
        _run(  # no superuser password: the superuser connects by peer through the socket
            _as_postgres(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(svc.pgdata),
                    "-U",
                    svc.superuser,
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                ]
            ),
            "initdb",
        )
    _write_hba(svc)
    svc.socket_dir.mkdir(parents=True, exist_ok=True)
    svc.socket_dir.chmod(0o700)
    _chown_postgres(svc.socket_dir, svc.pg_root)
    _run(_pg_ctl(svc, "start"), f"starting PostgreSQL (see {svc.pg_root / 'postgres.log'})")
    _ensure_databases(svc)


def _pg_options(svc: Services) -> str:
    listen = HOST if not svc.public else f"{HOST},{svc.host}"
    return (
        f"-p {svc.pg_port} -k {svc.socket_dir} -c listen_addresses={listen} "
        "-c unix_socket_permissions=0700"
    )


def _write_hba(svc: Services) -> None:
    """pg_hba.conf: the superuser by peer on the socket; `robustlab` by SCRAM to its two
    databases, over loopback, and from the named address's subnet when there is one."""
    dbs = ",".join(DATABASES)
    lines = [
        f"local all {svc.superuser} peer",
        f"local {dbs} {ROLE} scram-sha-256",
        f"host {dbs} {ROLE} 127.0.0.1/32 scram-sha-256",
        f"host {dbs} {ROLE} ::1/128 scram-sha-256",
    ]
    if svc.public:
        lines.append(f"host {dbs} {ROLE} samenet scram-sha-256")
    hba = svc.pgdata / "pg_hba.conf"
    text = "# written by robustlab services (see robustlab/services.py)\n" + "\n".join(lines)
    _run(_as_postgres(["tee", str(hba)]), "writing pg_hba.conf", stdin=text + "\n")


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of `password` (what it stores; RFC 5803 form)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored = hashlib.sha256(client_key).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def _psql(svc: Services, sql: str, db: str = "postgres") -> str:
    """Run `sql` through psql's standard input (a password in it never reaches a command line)."""
    cmd = [_pg_bin("psql"), "-h", str(svc.socket_dir), "-p", str(svc.pg_port), "-U", svc.superuser]
    cmd += ["-d", db, "-v", "ON_ERROR_STOP=1", "-tA", "-f", "-"]
    return _run(_as_postgres(cmd), "psql", stdin=sql)


def _ensure_databases(svc: Services) -> None:
    verifier = scram_verifier(svc.password())  # the server never sees the password itself
    quiet = "SET log_statement = 'none'; SET log_min_error_statement = 'panic';\n"
    if not _psql(svc, f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'").strip():
        _psql(svc, quiet + f"CREATE ROLE {ROLE} LOGIN PASSWORD '{verifier}'")
    else:
        _psql(svc, quiet + f"ALTER ROLE {ROLE} PASSWORD '{verifier}'")
    for db in DATABASES:
        if not _psql(svc, f"SELECT 1 FROM pg_database WHERE datname = '{db}'").strip():
            _psql(svc, f"CREATE DATABASE {db} OWNER {ROLE}")


def _pg_ctl(svc: Services, action: str, *flags: str) -> list[str]:
    """`pg_ctl <action>` on the services' cluster, with its options and log, waiting up to 60 s."""
    log = str(svc.pg_root / "postgres.log")
    command = [_pg_bin("pg_ctl"), "-D", str(svc.pgdata), "-o", _pg_options(svc), "-l", log]
    return _as_postgres([*command, *flags, "-w", "-t", "60", action])


def restart_postgres(svc: Services) -> None:
    """`pg_ctl restart` (fast mode: open connections are cut, as after a crash or a failover)."""
    _run(
        _pg_ctl(svc, "restart", "-m", "fast"),
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
    """The MLflow server's PID from the PID file, only when that process is still an
    `mlflow server` (a stale file may name a recycled PID of another program)."""
    try:
        pid = int(svc.pid_file.read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    words = [Path(a.decode(errors="replace")).name for a in argv]
    return pid if "mlflow" in words and "server" in words else None


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
    auth: list[str] = []
    env = {**svc.password_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if svc.public:
        hosts += f",{svc.connect_host}:{svc.mlflow_port}"
        auth = ["--app-name", "basic-auth"]
        env |= _auth_env(svc)
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
            svc.host,
            "--port",
            str(svc.mlflow_port),
            "--allowed-hosts",
            hosts,
            "--workers",
            "2",
            *auth,
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


def _auth_env(svc: Services) -> dict[str, str]:
    """The basic-auth app's configuration: its user store under the services' folder, the
    workers' login as its admin (the password only in the environment)."""
    ini = svc.root / "basic_auth.ini"
    db = f"sqlite:///{svc.root / 'basic_auth.db'}"
    ini.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = {db}\nadmin_username = {MLFLOW_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": svc.mlflow_password(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": svc.secret(
            "flask_secret_key", "MLflow server's Flask secret key"
        ),
    }


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
    if svc.public:
        values["MLFLOW_TRACKING_USERNAME"] = MLFLOW_USER
        values["MLFLOW_TRACKING_PASSWORD"] = svc.mlflow_password()
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
