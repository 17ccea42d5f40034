"""Seeds that reproduce and resumes that reproduce, through the `robustlab` CLI on real MNIST.

Two same-seed runs are bitwise equal on this CPU (oneDNN, op determinism on), so the end-to-end
checks use exact equality of metrics and of the logged models' logits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.cli import main
from robustlab.tracking import ensure_experiment
from tests.conftest import DATA_DIR

ROBUSTLAB = str(Path(sys.executable).parent / "robustlab")
SMALL = [
    "--train-size",
    "1024",
    "--eval-size",
    "300",
    "--robust-eval",
    "false",
    "--attack-steps",
    "3",
]
# 2048 images in batches of 64: 32 PGD-3 steps per epoch, time enough to be killed mid-epoch
RESUMABLE = [
    "--epochs", "2", "--train-size", "2048", "--batch-size", "64", "--eval-size", "300",
    "--robust-eval", "false", "--patience", "0", "--seed", "5", "--attack-steps", "3",
]  # fmt: skip
COMPARED = ("train/loss", "train/acc", "val/loss", "val/clean_acc", "val/pgd_acc")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "ROBUSTLAB_DATA_DIR": str(DATA_DIR),
        "ROBUSTLAB_PROGRESS_EVERY_S": "0",  # a progress line after every batch
        "PYTHONUNBUFFERED": "1",
    }


def _start(log: Path, *args: str) -> subprocess.Popen:
    """Start `robustlab <args>` in the background, its output going to `log`."""
    ensure_experiment()  # create the store's tables once, not in racing processes
    with log.open("w") as out:
        return subprocess.Popen([ROBUSTLAB, *args], stdout=out, stderr=out, env=_env())


def _finish(proc: subprocess.Popen, log: Path) -> str:
    """Wait for a started run to end well; return the id of the run it finished."""
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return re.search(r"run (\w+) finished", log.read_text()).group(1)


def _history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in COMPARED}


def _logits(run_id: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(mlflow.keras.load_model(f"runs:/{run_id}/model")(x, training=False))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from robustlab.data.mnist import load_mnist

    return load_mnist(DATA_DIR).test.x[:100]


@pytest.mark.slow
def test_same_seed_reproduces_bitwise_and_another_seed_differs(tracking, tmp_path, images):
    # side by side (also shows that a busy machine does not change the numbers)
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    procs = [
        _start(log, "perturbation", "--epochs", "1", *SMALL, "--seed", seed)
        for log, seed in zip(logs, ("3", "3", "4"), strict=True)
    ]
    a, b, c = (_finish(p, log) for p, log in zip(procs, logs, strict=True))
    client = MlflowClient()
    ma, mb, mc = (client.get_run(r).data.metrics for r in (a, b, c))
    keys = [*COMPARED, "test/clean_acc"]
    assert {k: ma[k] for k in keys} == {k: mb[k] for k in keys}
    np.testing.assert_array_equal(_logits(a, images), _logits(b, images))
    assert ma["train/loss"] != mc["train/loss"]
    assert np.abs(_logits(a, images) - _logits(c, images)).max() > 1e-3


def _wait_mid_epoch_2(proc: subprocess.Popen, log: Path, timeout: float = 600) -> int:
    """Poll the run's stderr until a few batches of epoch 2 are done; return the batch number."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        done = [int(b) for b in re.findall(r"epoch 2/2\s+batch (\d+)/", log.read_text())]
        if done and done[-1] >= 3:
            return done[-1]
        time.sleep(0.05)
    raise AssertionError("epoch 2 did not start in time:\n" + log.read_text()[-3000:])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_where_the_uninterrupted_run_ends(
    tracking, tmp_path, images
):
    straight_log, log = tmp_path / "straight.log", tmp_path / "killed.log"
    straight_proc = _start(straight_log, "perturbation", *RESUMABLE)  # side by side
    proc = _start(log, "perturbation", *RESUMABLE)
    try:
        batch = _wait_mid_epoch_2(proc, log)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    straight = _finish(straight_proc, straight_log)
    client = MlflowClient()
    exp = ensure_experiment()
    [killed] = [r for r in client.search_runs([exp]) if r.info.run_id != straight]
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"  # SIGKILL: nothing ended it
    assert batch < 32 and _history(run_id)["val/clean_acc"][-1][0] == 0  # killed inside epoch 2

    again = tmp_path / "resumed.log"
    assert (
        _finish(_start(again, "perturbation", *RESUMABLE, "--resume-run-id", run_id), again)
        == run_id
    )
    assert len(client.search_runs([exp])) == 2  # the resume made no new run
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    hist, ref = _history(run_id), _history(straight)
    assert [s for s, _ in hist["val/clean_acc"]] == [0, 1]  # each epoch logged once
    assert hist == ref
    final = resumed.data.metrics
    reference = client.get_run(straight).data.metrics
    for k in ("test/clean_acc", "ptb/epochs_run"):
        assert final[k] == reference[k], k
    np.testing.assert_array_equal(_logits(run_id, images), _logits(straight, images))


# --- refused resumes: one line, exit 2, nothing written ----------------------------------------


def _fake_run(regime: str, status: str, **params: str) -> str:
    """A run as an earlier training would have left it (tags, params, status; no checkpoint)."""
    client = MlflowClient()
    run = client.create_run(ensure_experiment(), tags={"robustlab.regime": regime})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _refused(capsys, *args: str) -> str:
    n_runs = len(MlflowClient().search_runs([ensure_experiment()]))
    assert main([*args, "--data-dir", str(DATA_DIR), "--train-size", "1024", "--epochs", "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln and " INFO mlflow." not in ln]
    assert len(err) == 1 and err[0].startswith(f"robustlab {args[0]}: error: "), err
    assert len(MlflowClient().search_runs([ensure_experiment()])) == n_runs  # no run created
    return err[0]


def test_refused_resumes_fail_in_one_line_before_writing(tracking, capsys):
    assert "seed must lie in" in _refused(capsys, "vanilla", "--seed", "-1")
    assert "no such run" in _refused(capsys, "vanilla", "--resume-run-id", "0" * 32)

    other = _fake_run("perturbation", "FAILED")
    assert "not vanilla" in _refused(capsys, "vanilla", "--resume-run-id", other)

    done = _fake_run("vanilla", "FINISHED")
    assert "nothing to resume" in _refused(capsys, "vanilla", "--resume-run-id", done)

    seeded = _fake_run("vanilla", "FAILED", seed="1", batch_size="128", deterministic="True")
    line = _refused(
        capsys, "vanilla", "--resume-run-id", seeded, "--seed", "2", "--deterministic", "false"
    )
    assert "seed='1'" in line and "deterministic='True'" in line and "batch_size" not in line

    empty = _fake_run("vanilla", "FAILED", seed="0")
    assert re.search(
        "no (intact )?checkpoint", _refused(capsys, "vanilla", "--resume-run-id", empty)
    )
    for run_id in (other, done, seeded, empty):  # the refused runs were not reopened
        assert MlflowClient().get_run(run_id).info.status in ("FAILED", "FINISHED")


def test_attack_random_starts_replay_from_a_saved_seed_in_a_new_traced_function(images):
    """What a resumed process relies on: starts depend on `perturb.seed` only, not on history."""
    import tensorflow as tf

    from robustlab.attacks import make_perturb_fn
    from robustlab.config import AttackConfig
    from robustlab.models import build_model

    model, y = build_model("madry_cnn"), tf.zeros(len(images), tf.int64)
    cfg = AttackConfig(eps=0.3, steps=1, step_size=0.01)

    def traced(perturb):
        return tf.function(lambda x, labels: perturb(model, x, labels))

    first = make_perturb_fn(cfg)
    first.seed.assign([7, 5 << 32])
    run = traced(first)
    a1, saved, a2 = run(images, y).numpy(), first.seed.numpy(), run(images, y).numpy()
    assert np.abs(a1 - a2).max() > 0.1  # each call draws new starts

    second = make_perturb_fn(cfg)  # a fresh process: new variable, new trace
    second.seed.assign(saved)
    np.testing.assert_array_equal(traced(second)(images, y).numpy(), a2)
    second.seed.assign([8, 5 << 32])
    assert np.abs(traced(second)(images, y).numpy() - a1).max() > 0.1  # another seed differs
