"""Bad input through the console script: one clear line, exit code 2, no run left RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def robustlab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(BIN / "robustlab"), *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def _no_running_runs(uri: str) -> None:
    client = MlflowClient(tracking_uri=uri)
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            assert run.info.status != "RUNNING", run.info.run_id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vanilla", "--epochs", "-1"], "epochs must be >= 0"),
        (["vanilla", "--model", "resnet"], "unknown model 'resnet'"),
        (["vanilla", "--train-size", "-5"], "train_size must be >= 0"),
        (["perturbation", "--eps", "1.5"], "eps must lie in [0, 1]"),
        (["perturbation", "--attack-steps", "0"], "attack_steps must be >= 1"),
        (["joint", "--mix-clean", "0.5", "--mix-ptb", "0.5", "--mix-inv", "0.5"], "must sum to 1"),
        (["sequential", "--order", "sideways"], "unknown order 'sideways'"),
        (["perturbation", "--step-size", "-0.1"], "step_size must be > 0"),
        (["perturbation", "--eps", "-0.1"], "eps must lie in [0, 1]"),
        (["perturbation", "--init-model", "runs:/0123456789abcdef/model"], "cannot load model"),
        (["invariance", "--inv-pool", "thesis_linf_eps0.4"], "has no human labels"),
    ],
)
def test_bad_parameters_fail_before_training(tracking, args, message):
    out = robustlab(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("robustlab ")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    _no_running_runs(tracking)


def test_corrupt_mnist_file(tracking, tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"\x00garbage")
    out = robustlab("vanilla", "--epochs", "1", "--data-dir", str(tmp_path))
    assert (
        out.returncode == 2
        and "not a readable .npz file" in out.stderr
        and "Traceback" not in out.stderr
    )
    _no_running_runs(tracking)


def test_unreachable_tracking_server(tracking):
    out = robustlab(
        "vanilla",
        "--epochs",
        "1",
        "--train-size",
        "256",
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
    )
    assert out.returncode == 2 and "is unreachable" in out.stderr and "Traceback" not in out.stderr


def test_an_init_model_with_the_wrong_input_shape_is_refused(tmp_path):
    import keras
    import mlflow

    from robustlab.errors import RobustlabError
    from robustlab.tracking import load_keras_model

    cifar_like = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    mlflow.keras.save_model(cifar_like, str(tmp_path / "m"))
    with pytest.raises(RobustlabError, match=r"expected input \(28, 28, 1\)"):
        load_keras_model(str(tmp_path / "m"))
