"""Whether an interrupted training run may be resumed: checked before anything is written."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from robustlab.credentials import redact_url
from robustlab.errors import ConfigError
from robustlab.tracking import configure_tracking, tracking_dir

# params that may differ between a run and its resumption (they do not change the training)
RESUME_FREE_PARAMS = frozenset({"resume_run_id", "data_dir", "eval_size"})
RUN_KEY_TAG = "robustlab.run_key"  # the --run-name that `--auto-resume` finds a run by


def _same_param(logged: str, value: object) -> bool:
    """Whether a logged param string and a config value agree (MLflow logs `str`, `mlflow run`
    logs what the user typed: `1e-3` and `0.001` agree)."""
    text = "" if value is None else str(value)
    if logged == text or {logged, text} <= {"", "None"}:
        return True
    try:
        return float(logged) == float(text)
    except ValueError:
        return logged.strip().lower() in ("true", "1", "false", "0") and (
            logged.strip().lower() in ("true", "1")
        ) == (text.strip().lower() in ("true", "1"))


def resumable_run(resume_run_id: str, regime: str) -> Run:
    """The run to resume, refused (one line) when it does not exist in the configured store,
    trained another regime, or FINISHED."""
    configure_tracking()
    try:
        old = MlflowClient().get_run(resume_run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types for an unknown id
        raise ConfigError(
            f"resume_run_id={resume_run_id}: no such run in {redact_url(mlflow.get_tracking_uri())}; "
            "pass the id of the interrupted run"
        ) from None
    ran = old.data.tags.get("robustlab.regime")
    if ran != regime:
        raise ConfigError(
            f"resume_run_id={resume_run_id} is a {ran or 'non-training'} run, not {regime}; "
            f"resume it with `robustlab {ran}`" + ("" if ran else " or start a fresh run")
        )
    if old.info.status == "FINISHED":
        raise ConfigError(
            f"resume_run_id={resume_run_id} FINISHED already; nothing to resume (start a new run, "
            "or use init_model=runs:/<id>/model to train on from its model)"
        )
    return old


def check_resume(resume_run_id: str, regime: str, params: dict[str, Any], mnist_digest: str) -> Run:
    """The run to resume, refused (one line, before anything is written) when it does not exist,
    trained another regime, ran with other training parameters or data, or FINISHED."""
    old = resumable_run(resume_run_id, regime)
    differ = sorted(
        k
        for k, v in params.items()
        if k not in RESUME_FREE_PARAMS
        and k in old.data.params
        and not _same_param(old.data.params[k], v)
        # `mlflow run` logged the entry point's step_size=0 ("method default") as typed
        and not (k == "step_size" and old.data.params[k] == "0")
    )
    if old.data.tags.get("robustlab.mnist_digest", mnist_digest) != mnist_digest:
        raise ConfigError(
            f"resume_run_id={resume_run_id} trained on another MNIST file (digest differs); "
            "point data_dir at the data that run used"
        )
    if differ:
        shown = ", ".join(f"{k}={old.data.params[k]!r} (now {params[k]!r})" for k in differ[:4])
        raise ConfigError(
            f"resume_run_id={resume_run_id} ran with {shown}; resume with that run's parameters"
        )
    return old


def has_checkpoint(run_id: str) -> bool:
    """Whether `run_id` left an epoch checkpoint, on this machine or in its artifacts."""
    from robustlab.tracking import local_checkpoint_dir
    from robustlab.train.checkpoint import CHECKPOINT_ARTIFACT, STATE

    local = local_checkpoint_dir(run_id)
    if (local / STATE).is_file() or any(local.glob(f"slot*/{STATE}")):
        return True
    try:
        return bool(MlflowClient().list_artifacts(run_id, CHECKPOINT_ARTIFACT))
    except Exception:  # noqa: BLE001 - an unreadable artifact store: no usable checkpoint
        return False


def _runs_by_key(run_key: str) -> list[Run]:
    """The runs started with `--run-name run_key --auto-resume`, newest first."""
    configure_tracking()
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        ids,
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
    )


def finished_run(run_key: str) -> str:
    """The id of the run that `--run-name run_key --auto-resume` trained to the end (its model is
    `runs:/<id>/model`); refused (one line) when there is none or the newest has not finished."""
    runs = _runs_by_key(run_key)
    if not runs:
        raise ConfigError(
            f"--run-name {run_key}: no run of that name in "
            f"{redact_url(mlflow.get_tracking_uri())}; train it first (--run-name {run_key} "
            "--auto-resume)"
        )
    run = runs[0]
    if run.info.status != "FINISHED":
        steps = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        done = max((m.step for m in steps), default=-1) + 1
        raise ConfigError(
            f"--run-name {run_key}: run {run.info.run_id} has not finished ({run.info.status}, "
            f"epoch {done} of {run.data.params.get('epochs', '?')} logged); resume it with the "
            "command that started it"
        )
    return run.info.run_id


def unfinished_run(run_key: str, regime: str | None) -> str | None:
    """The run `--auto-resume` continues: the newest run tagged `RUN_KEY_TAG = run_key` that did
    not finish and left a checkpoint (runs stopped before their first checkpoint are passed
    over), or None when there is none (start it). Refused (one line) when the newest such run
    FINISHED (its model exists) or trained another regime than `regime` (None: any)."""
    for run in _runs_by_key(run_key):
        run_id = run.info.run_id
        if run.info.status == "FINISHED":
            raise ConfigError(
                f"run {run_id} ({run_key}) FINISHED already: its model is runs:/{run_id}/model; "
                "pass another --run-name to train again"
            )
        if regime is not None and run.data.tags.get("robustlab.regime") != regime:
            raise ConfigError(
                f"run {run_id} ({run_key}) trained {run.data.tags.get('robustlab.regime')}, not "
                f"{regime}; pass another --run-name"
            )
        if has_checkpoint(run_id):
            return run_id
    return None


@contextmanager
def run_key_held(run_key: str) -> Iterator[None]:
    """Hold this host's lock on `run_key` in the configured store while the block runs, so that a
    second `--auto-resume` with the same --run-name neither continues nor starts the same run
    beside it; ConfigError (one line, before any run exists) naming the holder's pid. A lock
    file, not a store lease: two hosts resuming the same run key are not kept apart."""
    uri = redact_url(mlflow.get_tracking_uri())
    digest = hashlib.sha256(f"{uri}\0{run_key}".encode()).hexdigest()[:16]
    folder = tracking_dir() / "checkpoints" / "run_keys"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{digest}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"--run-name {run_key}: another process on this host (pid {holder}) is training "
                "it now; wait for it to end or stop it, then run the same command again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
