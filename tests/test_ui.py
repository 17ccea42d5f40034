"""What a person sees in the MLflow UI: robustlab's experiments are model-training experiments,
and the link robustlab prints opens a run in the training view (headless Chromium)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from robustlab.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    ensure_experiment,
    start_run,
    ui_link,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_every_experiment_robustlab_uses_is_tagged_as_model_training(tracking):
    client = MlflowClient()
    mine = ensure_experiment("robustlab")
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    # an experiment made elsewhere (mlflow run --experiment-name, the UI) gets the tag on use
    other = client.create_experiment("made-elsewhere")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(other).tags
    with start_run("r", experiment_id=other, parent_run_id=None, system_metrics=False):
        pass
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


def test_the_printed_link_opens_the_run_in_the_training_view(tracking, tmp_path, browser):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "robustlab"
    with start_run("ui-visible-run", system_metrics=False) as run:
        mlflow.log_metric("test/clean_acc", 0.987)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        exp = run.info.experiment_id
        link = ui_link(exp)
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp}")
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(link)
        page.get_by_text("ui-visible-run").first.wait_for(timeout=60_000)  # the runs table
        page.screenshot(path=str(tmp_path / "experiment.png"))
        page.goto(ui_link(exp, run.info.run_id))
        page.get_by_text("0.987").first.wait_for(timeout=60_000)  # the run page, its metric
    finally:
        mlflow.set_tracking_uri(tracking)
        server.terminate()
        server.wait(timeout=30)
