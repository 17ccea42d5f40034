"""Issue 26.4: a terminal shows robustlab's own lines and progress; TensorFlow's start-up chatter,
MLflow's INFO lines and Keras progress bars appear only with `robustlab --verbose`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"E0000|oneDNN|retracing|absl::InitializeLog|INFO mlflow|PyTorch not found")


def test_a_smoke_training_run_shows_no_tensorflow_chatter(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "ROBUSTLAB_TRACKING_DIR": str(tmp_path),
    }
    for key in ("TF_CPP_MIN_LOG_LEVEL", "ROBUSTLAB_VERBOSE", "MLFLOW_LOGGING_LEVEL"):
        env.pop(key, None)
    argv = ["vanilla", "--epochs", "1", "--train-size", "256", "--eval-size", "20"]
    out = subprocess.run(
        [sys.executable, "-m", "robustlab.cli", *argv, "--robust-eval", "false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[clean] epoch 1/1" in out.stderr and "finished; model at" in out.stdout + out.stderr
    assert [line for line in out.stderr.splitlines() if NOISE.search(line)] == []
    assert "━" not in out.stdout  # no Keras progress bar
