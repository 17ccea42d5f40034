"""Load and serve the champion: pyfunc through the alias, and the real `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# ART's import reconfigures logging and closes existing handlers' streams: import it before TF.
import art  # noqa: F401
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from robustlab.data.mnist import load_mnist
from robustlab.regimes import make_regime
from robustlab.train.runner import Extras, Judging, run_training
from tests.conftest import free_port

pytestmark = pytest.mark.slow
URI = "models:/robustlab-mnist@champion"


def _champion() -> None:
    """A really trained tiny model, registered and aliased `champion`."""
    cfg = RunConfig(
        data=DataConfig(None, 1024, 100), train=TrainConfig(epochs=1, seed=0, patience=0)
    ).validate()
    run_id = run_training(
        make_regime("vanilla", epochs=1),
        cfg,
        EvalConfig(),
        Extras(judge=Judging(robust_eval=False)),
    )
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    mv = mlflow.register_model(f"models:/{info.model_id}", "robustlab-mnist")
    MlflowClient().set_registered_model_alias("robustlab-mnist", "champion", mv.version)


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError("server not ready in time")


def test_pyfunc_and_served_champion_return_the_same_logits(tracking, tmp_path):
    _champion()
    test = load_mnist().test
    model = mlflow.pyfunc.load_model(URI)
    logits = np.asarray(model.predict(test.x[:300]))
    assert logits.shape == (300, 10)
    assert np.mean(logits.argmax(1) == test.y[:300]) > 0.3  # a trained model (chance: 0.1)
    x, expected = test.x[:8], logits[:8]
    assert x.dtype == np.float32 and x.shape == (8, 28, 28, 1)

    served = serve_and_predict(URI, x, tracking, tmp_path)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


def serve_and_predict(uri: str, x: np.ndarray, tracking: str, cwd: Path) -> np.ndarray:
    """Start `mlflow models serve` on a free loopback port, POST {"inputs": x}, return the logits;
    the server's whole process group is stopped at the end."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: stopped as a whole below
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ping", proc)
        answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})
        served = np.asarray(answer["predictions"], dtype=np.float32)
        assert served.shape == (len(x), 10)
        # a wrong shape is refused by the server, not silently reshaped
        with pytest.raises(urllib.error.HTTPError):
            _post(f"http://127.0.0.1:{port}/invocations", {"inputs": x[:, :14].tolist()})
        return served
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
