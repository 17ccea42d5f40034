"""MLflow tracking: the default embedded store in `tracking/`, remote servers, runs and models."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from robustlab.credentials import redact_url
from robustlab.errors import ConfigError, RobustlabError, TrackingError

TRACKING_DIR_ENV = "ROBUSTLAB_TRACKING_DIR"
DEFAULT_EXPERIMENT = "robustlab"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding an MLproject file."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "MLproject").is_file():
            return folder
    return here


def tracking_dir() -> Path:
    return Path(os.environ.get(TRACKING_DIR_ENV) or project_root() / "tracking").resolve()


def local_checkpoint_dir(run_id: str) -> Path:
    """Where a training run keeps its per-epoch checkpoint on this machine (besides the run's
    artifacts), so that it survives a tracking server that goes away mid-run."""
    return tracking_dir() / "checkpoints" / run_id


def default_tracking_uri() -> str:
    """SQLite store `tracking/mlflow.db` (absolute URI: four slashes)."""
    return f"sqlite:///{tracking_dir() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI when set (checking a server is reachable), else the embedded store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                ok = resp.status == 200
        except urllib.error.HTTPError as exc:
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={redact_url(uri)} answered /health with HTTP {exc.code}: it is not an "
                "MLflow tracking server; check the host and port"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={redact_url(uri)} is unreachable ({reason}); start the server (make server) or unset the variable"
            ) from None
        if not ok:
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={redact_url(uri)} answered /health with an error; check the server"
            )
        check_mlflow_server(uri)
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def _auth_headers() -> dict[str, str]:
    """The credentials the MLflow client would send ($MLFLOW_TRACKING_TOKEN or basic auth)."""
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        pair = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


def check_mlflow_server(uri: str) -> None:
    """TrackingError unless `uri` answers MLflow's REST API (not just any /health)."""
    import json

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            body = json.loads(resp.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={redact_url(uri)} refused our credentials (HTTP {exc.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        body = None
    except (urllib.error.URLError, OSError, ValueError):
        body = None
    if not isinstance(body, dict):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={redact_url(uri)} answers /health but is not an MLflow tracking server "
            "(no MLflow REST API at /api/2.0/mlflow); check the host and port"
        )


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the MLflow UI opens such experiments on their runs
_KIND_TAGGED: set[tuple[str, str]] = set()


def tag_training_experiment(experiment_id: str) -> None:
    """Mark an experiment as a model-training one (once per process and store), so the MLflow UI
    opens it on its runs rather than on its GenAI views (traces, token usage)."""
    key = (mlflow.get_tracking_uri(), str(experiment_id))
    if key in _KIND_TAGGED:
        return
    client = MlflowClient()
    if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    _KIND_TAGGED.add(key)


LOCAL_UI = "http://127.0.0.1:5000"  # where `make server` serves the embedded store


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """A link that opens the run (or experiment) in the MLflow UI's model-training view. The
    tracking server when there is one, else `make server`'s address. (MLflow 3.17's UI chooses
    its GenAI or training view from a switch kept in the browser, default GenAI, and ignores
    the experiment's kind tag: the link names the training view explicitly.)"""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{path}?workflowType=machine_learning"


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Experiment id of `name` (a model-training experiment), creating it with artifacts under
    `tracking/artifacts/` on a local store."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        tag_training_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (tracking_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
    )


@contextmanager
def start_run(
    run_name: str | None = None,
    *,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    system_metrics: bool = True,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    run_id: str | None = None,
) -> Iterator[Run]:
    """An MLflow run that ends FAILED (never RUNNING) if the body raises.

    Under `mlflow run` the run created by MLflow ($MLFLOW_RUN_ID) is picked up; otherwise the
    experiment $MLFLOW_EXPERIMENT_NAME (default "robustlab") is used. `parent_run_id` and
    `experiment_id` nest the run under a parent that may live in another process (tuning workers).
    `run_id` reopens that existing run (in its own experiment, under its own parent) instead of
    creating one: resuming continues it.
    """
    if run_id is not None:
        configure_tracking()
    elif parent_run_id or experiment_id:
        if not mlflow.active_run():
            configure_tracking()
    elif not nested and not os.environ.get("MLFLOW_RUN_ID"):
        configure_tracking()
        mlflow.set_experiment(
            experiment_id=ensure_experiment(
                os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            )
        )
    elif not nested:
        configure_tracking()
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested or parent_run_id is not None,
        log_system_metrics=system_metrics,
        parent_run_id=None if run_id else parent_run_id,
        experiment_id=None if run_id else experiment_id,
    ) as run:
        tag_training_experiment(run.info.experiment_id)  # also under `mlflow run`, nested, ...
        if params:
            # `mlflow run` has already logged the entry point's parameters (quoting empty ones);
            # MLflow refuses to change a param, so add only the ones it has not logged.
            logged = run.data.params if run.data else {}
            fresh = {k: ("" if v is None else v) for k, v in params.items() if k not in logged}
            if fresh:
                mlflow.log_params(fresh)
        if tags:
            mlflow.set_tags(tags)
        yield run


MODEL_URI_SCHEMES = (
    "runs",
    "models",
    "file",
    "http",
    "https",
    "s3",
    "gs",
    "wasbs",
    "hdfs",
    "dbfs",
    "mlflow-artifacts",
)


def check_model_uri(model_uri: str, what: str = "model URI") -> None:
    """Cheap checks of a model URI before anything runs (the tracking URI must be configured):
    a known scheme, an existing run for runs:/, an existing registered model for models:/,
    an existing path for a plain path. Raises a one-line ConfigError."""
    from mlflow.exceptions import MlflowException

    hint = "use runs:/<run_id>/model, models:/<name>@<alias> or a local model folder"
    scheme, sep, rest = model_uri.partition(":")
    if not sep or len(scheme) < 2:  # no scheme (a Windows drive letter is not one either)
        if not Path(model_uri).expanduser().exists():
            raise ConfigError(f"{what} {model_uri!r}: no such file or folder; {hint}")
        return
    if scheme not in MODEL_URI_SCHEMES:
        raise ConfigError(f"{what} {model_uri!r}: unknown scheme {scheme + ':'!r}; {hint}")
    client = MlflowClient()
    if scheme == "runs":
        run_id = rest.lstrip("/").split("/", 1)[0]
        if not run_id or "/" not in rest.lstrip("/"):
            raise ConfigError(f"{what} {model_uri!r} is incomplete; {hint}")
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"{what} {model_uri!r}: no run {run_id} in this tracking store "
                f"({redact_url(mlflow.get_tracking_uri())}); check the run id"
            ) from None
    elif scheme == "models":
        name = rest.lstrip("/").split("@", 1)[0].split("/", 1)[0]
        if not name:
            raise ConfigError(f"{what} {model_uri!r} names no model; {hint}")
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise ConfigError(
                f"{what} {model_uri!r}: no registered model {name!r} in this tracking store; "
                "register it first (or check the name)"
            ) from None


def run_id_of(model_uri: str) -> str | None:
    """The run that logged `model_uri` (runs:/ or models:/), or None when it cannot be told."""
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/", 1)[0]
    try:
        from mlflow.models import get_model_info

        return get_model_info(model_uri).run_id
    except Exception:  # noqa: BLE001
        return None


def load_keras_model(model_uri: str):
    """Load a logged Keras model and check it takes (28, 28, 1) images and outputs 10 logits;
    a local model folder's signature and recorded weights digests are checked first."""
    import keras

    from robustlab.model_folder import check_model_folder, is_model_folder

    if is_model_folder(model_uri):
        check_model_folder(model_uri)
    try:
        # safe_mode: never deserialize Python code (Lambda layers) from a model file
        model = mlflow.keras.load_model(model_uri, load_model_kwargs={"safe_mode": True})
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        raise RobustlabError(
            f"cannot load model {model_uri!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check the URI"
        ) from None
    if not isinstance(model, keras.Model):
        raise RobustlabError(f"{model_uri} is not a Keras model")
    shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if shape != (28, 28, 1) or tuple(model.output_shape[1:]) != (10,):
        raise RobustlabError(
            f"{model_uri}: expected input (28, 28, 1) and 10 outputs, got {shape} -> {model.output_shape[1:]}"
        )
    return model
