"""Secrets stay out of command lines, run parameters, tags, study attributes and logs.

Connection URLs reach robustlab through the environment (`ROBUSTLAB_OPTUNA_STORAGE`,
`MLFLOW_TRACKING_URI`) or through a mode-600 env file named by `ROBUSTLAB_SERVICES_ENV` (what
`robustlab services start` writes: `tracking/services.env`). A storage URL that carries a
password is refused on a command line: `ps` shows a command line to every user of the machine,
and `mlflow run -P storage=…` would log it as a run parameter anyone with the UI can read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from robustlab.errors import ConfigError, SecretError

STORAGE_ENV = "ROBUSTLAB_OPTUNA_STORAGE"
SERVICES_ENV = "ROBUSTLAB_SERVICES_ENV"
ENV_KEYS = (
    "MLFLOW_TRACKING_URI",
    STORAGE_ENV,
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "passfile", "token"})


def _parsed(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def redact_url(url: str) -> str:
    """The URL without a password: SQLAlchemy's rendering with the password hidden, and query
    keys that carry one (`password`, `sslpassword`, ...) dropped. A URL it cannot parse is
    shown as its scheme only when it might hold a secret."""
    parsed = _parsed(url)
    if parsed is None:
        return url.split("://", 1)[0] + "://***" if "@" in url or "password" in url else url
    query = {k: v for k, v in parsed.query.items() if k.lower() not in SECRET_QUERY_KEYS}
    return parsed.set(query=query).render_as_string(hide_password=True)


def has_password(url: str) -> bool:
    """Whether `url` carries a password (in its user part or as a query key)."""
    parsed = _parsed(url)
    if parsed is None:
        return "@" in url and ":" in url.split("://", 1)[-1].split("@", 1)[0]
    return parsed.password is not None or any(k.lower() in SECRET_QUERY_KEYS for k in parsed.query)


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """KEY=VALUE lines of a mode-600 env file; ConfigError (one line) when it is missing, not a
    file, readable by other users, unreadable or malformed."""
    p = Path(path).expanduser()
    fix = "run `robustlab services start` (it writes tracking/services.env) or point "
    fix += f"${SERVICES_ENV} at the file"
    if not p.is_file():
        raise ConfigError(f"${SERVICES_ENV}={p}: no such file; {fix}")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"${SERVICES_ENV}={p} is readable by other users (mode {mode:03o}), and "
            f"it is where connection passwords live; chmod 600 {p}"
        )
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"${SERVICES_ENV}={p}: cannot read it ({type(exc).__name__}); {fix}"
        ) from None
    values: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.removeprefix("export ").partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(
                f"${SERVICES_ENV}={p}: line {n} is not KEY=VALUE; write one NAME=value per line"
            )
        values[key.strip()] = value.strip().strip("'\"")
    unknown = [k for k in values if k not in ENV_KEYS]
    if unknown or not values:
        raise ConfigError(
            f"${SERVICES_ENV}={p}: expected {', '.join(ENV_KEYS)}, found "
            f"{', '.join(unknown or ['nothing'])}; {fix}"
        )
    return values


def apply_services_env() -> None:
    """Load the env file named by $ROBUSTLAB_SERVICES_ENV (when set) into this process's
    environment; variables already set win."""
    path = os.environ.get(SERVICES_ENV)
    if not path:
        return
    for key, value in read_env_file(path).items():
        os.environ.setdefault(key, value)


def refuse_password_argument(url: str | None, option: str = "--storage") -> None:
    """ConfigError (one line, without the password) for a storage URL with a password given as
    a command-line option or `mlflow run` parameter."""
    if url and has_password(url):
        raise SecretError(
            f"{option} {redact_url(url)} carries a password, which a command line shows to "
            "every user of the machine and `mlflow run` logs as a run parameter; put the URL in "
            f"${STORAGE_ENV} (or in a mode-600 file named by ${SERVICES_ENV}, such as "
            "tracking/services.env) and drop the option"
        )
