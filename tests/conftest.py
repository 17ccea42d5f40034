"""Shared test set-up: real MNIST from the shared data folder, a temporary MLflow store per test."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROBUSTLAB_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

# ART configures logging when first imported and closes the handlers that exist then; imported
# inside a test after TensorFlow, that closes absl's handler, whose stream is pytest's capture
# file, and pytest dies ("I/O operation on closed file"). Import it once, before any test.
import art  # noqa: E402,F401

DATA_DIR = Path(os.environ["ROBUSTLAB_DATA_DIR"])


@pytest.fixture(autouse=True)
def _no_inherited_experiment_or_run():
    """`mlflow.set_experiment` exports MLFLOW_EXPERIMENT_ID (and a run may leave MLFLOW_RUN_ID):
    one test's choice must not leak into the next test's subprocesses (`mlflow run
    --experiment-name` refuses an inherited experiment id)."""
    import mlflow.tracking.fluent

    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        os.environ.pop(key, None)
    mlflow.tracking.fluent._active_experiment_id = None  # set_experiment's in-process twin


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store (and artifact folder) for one test; returns its URI."""
    import mlflow

    folder = tmp_path / "tracking"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("ROBUSTLAB_TRACKING_DIR", str(folder))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID, which would leak this store's id into
    # later tests (`mlflow run --experiment-name` then refuses: "only one of ...")
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    """Debian's headless Chromium through Playwright (.ci/run installs the package)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: install the Debian package chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
