"""End to end: `mlflow run . -e vanilla` on a small real MNIST slice, read back from the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.data.mnist import load_mnist
from robustlab.tracking import ensure_experiment
from tests.conftest import DATA_DIR, REPO

pytestmark = pytest.mark.slow


def mlflow_run(entry: str, tracking_dir: Path, *params: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # sample system metrics every second so that even a seconds-long test run records some
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
    }
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "run",
        str(REPO),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        "robustlab",
    ]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=tracking_dir
    )


def test_vanilla_through_mlflow_run(tracking, tmp_path):
    ensure_experiment("robustlab")
    out = mlflow_run(
        "vanilla",
        tmp_path,
        "epochs=2",
        "train_size=2000",
        "eval_size=600",
        "seed=1",
        "robust_eval=false",
        f"data_dir={DATA_DIR}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    [run] = client.search_runs([ensure_experiment("robustlab")])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["regime"] == "vanilla"
    m = run.data.metrics
    assert m["test/clean_acc_ci_low"] < m["test/clean_acc"] < m["test/clean_acc_ci_high"]
    assert m["test/n_images"] == 600 and m["test/clean_acc"] > 0.8
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [h.step for h in history] == [0, 1]
    assert {"train/acc", "val/clean_acc", "time/epoch_seconds"} <= set(m)
    assert any(k.startswith("system/") for k in m), "system metrics are logged"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "checkpoint", "excluded_test_indices.json"} <= artifacts
    assert run.outputs.model_outputs, "the model is logged as an MLflow LoggedModel of the run"
    # the test grid, and the validation curves (one point per epoch) a reader looks at
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/test_predictions.png",
        "plots/validation_curves.png",
    ]
    inputs = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"mnist-training", "mnist-validation", "mnist-evaluation"} <= inputs

    # the logged model loads through pyfunc, returns logits, and reproduces the logged accuracy
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None
    test = load_mnist(DATA_DIR, eval_size=600).test
    from robustlab.data.mnist import subsample

    test = subsample(load_mnist(DATA_DIR).test, 600, seed=1)
    logits = np.asarray(model.predict(test.x))
    assert logits.shape == (600, 10) and not np.allclose(logits.sum(axis=1), 1.0)
    assert np.mean(logits.argmax(axis=1) == test.y) == pytest.approx(m["test/clean_acc"])


def test_bad_parameter_through_mlflow_run_marks_the_run_failed(tracking, tmp_path):
    ensure_experiment("robustlab")
    out = mlflow_run("vanilla", tmp_path, "epochs=-1")
    assert out.returncode != 0
    assert "epochs must be >= 0" in out.stderr
    [run] = MlflowClient().search_runs([ensure_experiment("robustlab")])
    assert run.info.status == "FAILED"


def test_a_killed_run_resumes_from_its_last_checkpoint(tracking, tmp_path):
    import json
    import signal
    import time

    from tests.test_cli import BIN

    args = [
        str(BIN / "robustlab"),
        "vanilla",
        "--epochs",
        "3",
        "--train-size",
        "8000",
        "--eval-size",
        "300",
        "--robust-eval",
        "false",
        "--patience",
        "0",
        "--data-dir",
        str(DATA_DIR),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = Path(os.environ["ROBUSTLAB_TRACKING_DIR"]) / "artifacts" / "robustlab"
    deadline = time.time() + 300
    state = None
    while time.time() < deadline and proc.poll() is None:
        found = list(folder.glob("*/artifacts/checkpoint/slot0/state.json"))
        if found:
            try:
                state = json.loads(found[0].read_text())
            except (OSError, ValueError):
                state = None  # being written
            if state is not None and state["epoch"] == 0:
                proc.send_signal(signal.SIGKILL)  # a crash after the first epoch
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert state is not None and state["epoch"] == 0, "the first checkpoint never appeared"
    [crashed] = MlflowClient().search_runs([ensure_experiment("robustlab")])
    out = subprocess.run(
        [*args, "--resume-run-id", crashed.info.run_id], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [resumed] = MlflowClient().search_runs([ensure_experiment("robustlab")])  # the same run
    assert resumed.info.run_id == crashed.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["robustlab.resumed_after_epoch"] == "0"
    steps = [m.step for m in MlflowClient().get_metric_history(resumed.info.run_id, "val/loss")]
    assert steps == [0, 1, 2]  # epoch 1 from the killed process, 2 and 3 from the resumed one
    assert resumed.data.metrics["test/clean_acc"] > 0.9
