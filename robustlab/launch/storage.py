"""Where studies live: the storage URL, opening it (with heartbeats), and never showing a password.

The URL is the argument, else $ROBUSTLAB_OPTUNA_STORAGE, else the SQLite file
`tracking/optuna.db`. A URL is shown (tags, study attributes, errors, logs) only redacted.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from robustlab.credentials import STORAGE_ENV, has_password, redact_url
from robustlab.errors import ConfigError
from robustlab.tracking import tracking_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class Heartbeat:
    """A worker beats every `interval` s; a trial silent for `grace_period` s is retried (with
    its parameters) up to `max_retry` times."""

    interval: int = 60
    grace_period: int = 180
    max_retry: int = 2

    def validate(self) -> Heartbeat:
        if self.interval < 1 or self.grace_period <= self.interval:
            raise ConfigError(
                "heartbeat_interval must be >= 1 s and grace_period longer than it, got "
                f"{self.interval} and {self.grace_period}"
            )
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be >= 0, got {self.max_retry}")
        return self


def storage_url(explicit: str | None = None) -> str:
    """`explicit`, else $ROBUSTLAB_OPTUNA_STORAGE, else SQLite `tracking/optuna.db`."""
    if explicit:
        return explicit
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    folder = tracking_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


class TolerantRDBStorage(RDBStorage):
    """An RDBStorage whose heartbeat survives a database restart: Optuna's heartbeat thread dies
    on the first failed write, which would get a live trial retried; skip one beat instead."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy OperationalError and friends
            print(f"note: heartbeat skipped ({type(exc).__name__})", file=sys.stderr, flush=True)


def open_storage(url: str, heartbeat: Heartbeat | None = None) -> RDBStorage:
    """An RDB storage (with heartbeats when `heartbeat` is given); ConfigError when it cannot be
    opened. Connections are checked before use (`pool_pre_ping`), so a restarted PostgreSQL is
    reconnected to rather than failing the worker."""
    if url.startswith("sqlite"):
        engine_kwargs: dict = {"connect_args": {"timeout": 30}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            engine_kwargs["connect_args"] = {"connect_timeout": 10}
    beats = {}
    if heartbeat is not None:
        beats = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=heartbeat.max_retry
            ),
        }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TolerantRDBStorage(url, engine_kwargs=engine_kwargs, **beats)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/Optuna raise many types for a bad URL
        raise ConfigError(storage_problem(url, exc)) from None


def storage_problem(url: str, exc: Exception) -> str:
    """One line for a storage that cannot be used, without the password."""
    text = " ".join(str(exc).split())
    shown = redact_url(url)
    if url.startswith("postgresql"):
        if "password authentication failed" in text or "no password supplied" in text:
            why = "PostgreSQL refused the user or password"
            fix = "check the user and $ROBUSTLAB_PG_PASSWORD (tracking/services.env holds the URL)"
        elif "does not exist" in text:
            why = text.split("FATAL:")[-1].strip()[:120]
            fix = "check the database name in the URL"
        else:
            why = "cannot connect to PostgreSQL"
            fix = "check host and port, and that it runs (robustlab services status)"
        return f"cannot open the study storage {shown} ({why}); {fix}"
    msg = text[:160] if text else type(exc).__name__
    if url in msg:
        msg = msg.replace(url, shown)
    return (
        f"cannot open the study storage {shown!r} ({msg}); pass an RDB URL such as "
        "sqlite:////abs/path/optuna.db or postgresql+psycopg://user@host/db"
    )


def study_names(storage: RDBStorage) -> set[str]:
    return {s.study_name for s in storage.get_all_studies()}


def load_existing(storage: RDBStorage, name: str) -> optuna.Study | None:
    """The study `name`, or None when the storage has none of that name."""
    if name not in study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


__all__ = [
    "STORAGE_ENV",
    "Heartbeat",
    "has_password",
    "load_existing",
    "open_storage",
    "redact_url",
    "storage_problem",
    "storage_url",
]
