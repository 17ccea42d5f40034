"""Where studies live: the storage URL, opening it (with heartbeats), and never showing a password.

The URL is the argument, else $ROBUSTLAB_OPTUNA_STORAGE, else the SQLite file
`tracking/optuna.db`. A URL is shown (tags, study attributes, errors, logs) only redacted.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from robustlab.config import Heartbeat
from robustlab.credentials import STORAGE_ENV, has_password, redact_url
from robustlab.errors import ConfigError
from robustlab.launch.optuna_compat import StaleAwareRDBStorage
from robustlab.tracking import tracking_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(explicit: str | None = None) -> str:
    """`explicit`, else $ROBUSTLAB_OPTUNA_STORAGE, else SQLite `tracking/optuna.db`."""
    if explicit:
        return explicit
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    folder = tracking_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


DB_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)
OUTAGE_PATIENCE_S = float(os.environ.get("ROBUSTLAB_DB_PATIENCE_S", "600"))
_LAST_OUTAGE = [-math.inf]  # monotonic time this process last found the database unreachable


def last_outage() -> float:
    """When (time.monotonic) this process last failed to reach the study's database."""
    return _LAST_OUTAGE[0]


def with_db_retry(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, retried with backoff while the database is unreachable, for up to
    OUTAGE_PATIENCE_S seconds (a restarted or failed-over PostgreSQL); then the error."""
    deadline, delay, told = time.monotonic() + OUTAGE_PATIENCE_S, 0.5, False
    while True:
        try:
            return fn(*args, **kwargs)
        except DB_ERRORS as exc:
            _LAST_OUTAGE[0] = time.monotonic()
            if time.monotonic() > deadline:
                raise
            if not told:
                print(
                    f"note: the study's database is unreachable ({type(exc).__name__}); "
                    f"retrying for up to {OUTAGE_PATIENCE_S:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            time.sleep(delay)
            delay = min(5.0, delay * 2)


class TolerantRDBStorage(StaleAwareRDBStorage):
    """An RDBStorage that rides out a database outage: its idempotent calls are retried while
    the database is unreachable (`with_db_retry`), and the heartbeat skips a beat instead of
    dying (Optuna's heartbeat thread dies on the first failed write, which would get a live
    trial retried).

    Two writes are not idempotent and are reconciled instead: a retried `create_new_trial`
    (or a pop whose RUNNING write committed before the connection broke) may leave a RUNNING
    trial that nobody works on; it never beats, so it is stale once the grace period has passed
    (`StaleAwareRDBStorage`) and is failed and re-queued like a dead worker's trial. A retried
    `tell` is reconciled by the launcher (`_tell`)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy OperationalError and friends
            _LAST_OUTAGE[0] = time.monotonic()
            print(f"note: heartbeat skipped ({type(exc).__name__})", file=sys.stderr, flush=True)


def _retried(name: str):
    original = getattr(StaleAwareRDBStorage, name)

    def method(self, *args, **kwargs):
        return with_db_retry(original, self, *args, **kwargs)

    method.__name__, method.__doc__ = name, original.__doc__
    return method


for _name in (  # the public calls a worker or leader makes during a study
    "set_study_user_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
):
    setattr(TolerantRDBStorage, _name, _retried(_name))


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
    "with_db_retry",
]
