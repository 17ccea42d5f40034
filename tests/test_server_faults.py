"""A real `mlflow server` that goes away in the middle of a training run (SIGTERM) and comes back.

- Back within MLflow's client retries: the run just finishes.
- Not back in time: the command fails with one line naming the local checkpoint it kept
  (tracking/checkpoints/<run_id>/), and `--resume-run-id` continues from that local copy once the
  server is back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
# small, real: 256 MNIST images, 6 epochs, clean evaluation on 200 test images, no attacks
TRAIN = ["vanilla", "--epochs", "6", "--train-size", "256", "--batch-size", "64"]
TRAIN += ["--eval-size", "200", "--robust-eval", "false", "--patience", "0"]


class Server:
    """`mlflow server` on a fixed port with its store and artifacts in a tmp folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited at start"
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not become healthy in 90 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def _env(server: Server, tracking: Path, retries: int, backoff: int) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.url,
        "ROBUSTLAB_TRACKING_DIR": str(tracking),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),  # conftest sets 0 for speed
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _start_training(env: dict[str, str], cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "robustlab"), *TRAIN, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _first_local_checkpoint(tracking: Path, proc: subprocess.Popen) -> Path:
    """Wait for the run's first epoch checkpoint on local disk; return its folder."""
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tracking / "checkpoints").glob("*/state.json"))
        if found:
            return found[0].parent
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no local checkpoint after 300 s")


def test_server_back_within_the_retries_the_run_finishes(server, tmp_path):
    tracking = tmp_path / "tracking"
    proc = _start_training(_env(server, tracking, retries=6, backoff=2), tmp_path)
    run_id = _first_local_checkpoint(tracking, proc).name
    server.stop()
    time.sleep(2)
    server.start()  # same port, same store
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run = MlflowClient(tracking_uri=server.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(6)), "an epoch's metrics were lost"
    assert "test/clean_acc" in run.data.metrics
    assert not (tracking / "checkpoints" / run_id).exists(), "a finished run keeps no local copy"


def test_server_gone_for_good_fails_naming_the_local_checkpoint_then_resumes(server, tmp_path):
    tracking = tmp_path / "tracking"
    env = _env(server, tracking, retries=2, backoff=1)
    proc = _start_training(env, tmp_path)
    local = _first_local_checkpoint(tracking, proc)
    run_id = local.name
    server.stop()
    _, err = proc.communicate(timeout=600)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith("robustlab vanilla: error: lost the tracking server"), err[-3000:]
    assert f"kept in {local}" in last and f"--resume-run-id {run_id}" in last
    assert "Traceback" not in err
    assert (local / "state.json").is_file() and (local / "model.weights.h5").is_file()

    server.start()
    res = subprocess.run(
        [str(BIN / "robustlab"), *TRAIN, "--resume-run-id", run_id],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming {run_id} from the local checkpoint {local}" in res.stderr
    client = MlflowClient(tracking_uri=server.url)
    finished = [
        r
        for r in client.search_runs([client.get_experiment_by_name("robustlab").experiment_id])
        if r.info.status == "FINISHED"
    ]
    assert len(finished) == 1 and "test/clean_acc" in finished[0].data.metrics
    # the resumed run is the interrupted run itself, continued from the local checkpoint
    assert finished[0].info.run_id == run_id
    assert "robustlab.resumed_after_epoch" in finished[0].data.tags
    assert not local.exists(), "the local copy is removed once the resumed run has finished"
