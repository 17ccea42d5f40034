"""Tracking: the embedded SQLite store, a real `mlflow server` over HTTP, unreachable servers."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from robustlab.errors import TrackingError
from robustlab.tracking import configure_tracking, start_run
from tests.conftest import free_port


def test_default_store_lives_in_the_tracking_folder(tmp_path, monkeypatch):
    folder = tmp_path / "tracking"
    monkeypatch.setenv("ROBUSTLAB_TRACKING_DIR", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with start_run("t", params={"a": 1}, system_metrics=False) as run:
        mlflow.log_metric("val/loss", 0.5)
        mlflow.log_text("hello", "note.txt")
    assert configure_tracking() == f"sqlite:///{folder / 'mlflow.db'}"
    assert (folder / "mlflow.db").is_file()
    assert (
        folder / "artifacts" / "robustlab" / run.info.run_id / "artifacts" / "note.txt"
    ).read_text() == "hello"
    got = MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.params == {"a": "1"}


def test_a_failing_body_leaves_the_run_failed_not_running(tracking):
    with pytest.raises(RuntimeError), start_run("boom", system_metrics=False) as run:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_unreachable_tracking_server_is_one_clear_error(monkeypatch, tmp_path):
    """(The whole command, nothing written locally: tests/test_bad_input.py.)"""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ROBUSTLAB_TRACKING_DIR", str(tmp_path / "tracking"))
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable.*make server"):
        configure_tracking()
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "tracking").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    db, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:]) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not become healthy in 90 s")
    yield url, artifacts
    proc.terminate()
    proc.wait(timeout=30)


def test_logging_to_a_real_mlflow_server_over_http(mlflow_server, monkeypatch):
    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with start_run("remote", params={"regime": "vanilla"}, system_metrics=False) as run:
        mlflow.log_metrics({"val/loss": 0.25, "test/clean_acc": 0.99}, step=0)
        mlflow.log_text("remote artifact", "plots/readme.txt")
    client = MlflowClient(tracking_uri=url)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["test/clean_acc"] == 0.99 and got.data.params["regime"] == "vanilla"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/readme.txt"]
    assert list(artifacts.rglob("readme.txt")), (
        "the server stored the artifact in its artifacts folder"
    )
