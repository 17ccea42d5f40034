"""The champion run (`make champion`): TRADES on small_cnn with SGD and a step schedule, found
again and resumed by `--auto-resume` after an interruption, refused beside a running one, when
resumed with other arguments, or once finished."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab import cli
from robustlab.train import runner
from robustlab.train.curves import CURVES_ARTIFACT
from tests.conftest import REPO
from tests.test_register import EVAL_NO_AA


def champion_args() -> list[str]:
    """`make champion`'s arguments (CHAMPION_ARGS in the Makefile)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith("CHAMPION_ARGS :=")]
    return line.split(":=", 1)[1].split()


# the champion's command shrunk to seconds: 4 epochs of 2 batches, TRADES-2, another run name
SMALL = {"--epochs": "4", "--attack-steps": "2", "--run-name": "champ-test"}
ARGV = ["perturbation"]
for _arg, _next in zip(champion_args(), [*champion_args()[1:], ""], strict=True):
    if _arg.startswith("--"):
        ARGV += [_arg] if _next.startswith("--") or not _next else [_arg, SMALL.get(_arg, _next)]
ARGV += ["--train-size", "256", "--eval-size", "100", "--robust-eval", "false"]


def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _one_line(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("robustlab perturbation: error:") and fragment in err[-1], err[-5:]


def test_auto_resume_continues_the_interrupted_run_and_refuses_other_arguments(
    tracking, monkeypatch, capsys, tmp_path
):
    real = runner.log_checkpoint
    beside: list[subprocess.CompletedProcess] = []

    def stop_after_first(folder, run_id):  # the machine dies once epoch 1's checkpoint is logged
        real(folder, run_id)
        # ... and just before, the same command ran in another process beside this one
        command = [sys.executable, "-m", "robustlab.cli", *ARGV]
        beside.append(subprocess.run(command, capture_output=True, text=True, timeout=300))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "log_checkpoint", stop_after_first)
    assert cli.main(ARGV) == 130
    monkeypatch.setattr(runner, "log_checkpoint", real)
    [run] = _runs()  # the command beside it created nothing: one line naming this process
    run_id = run.info.run_id
    assert run.info.status != "FINISHED" and run.data.params["optimizer"] == "sgd"
    [second] = beside
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    assert line.startswith("robustlab perturbation: error: --run-name champ-test:"), line
    assert f"(pid {os.getpid()}) is training it now" in line

    # other arguments: one line, exit 2, nothing created or changed
    other = [*ARGV]
    other[other.index("--learning-rate") + 1] = "0.02"
    assert cli.main(other) == 2
    _one_line(capsys, "learning_rate='0.01' (now 0.02)")
    [same] = _runs()
    assert same.info.run_id == run_id and same.info.status == run.info.status

    # `make champion-ship` before the run finished: one line saying how far it is, nothing made
    shipped = tmp_path / "pretrained" / "champ"
    assert cli.main(["register", "--run-name", "champ-test", "--export", str(shipped)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"robustlab register: error: --run-name champ-test: run {run_id}")
    assert "has not finished (FAILED, epoch 1 of 4 logged); resume it" in err[-1], err[-1]
    assert not shipped.parent.exists() and len(_runs()) == 1

    # the same command resumes that run from its checkpoint and finishes it
    assert cli.main(ARGV) == 0, capsys.readouterr().err[-3000:]
    [done] = _runs()
    assert done.info.run_id == run_id and done.info.status == "FINISHED"
    assert done.data.tags["robustlab.resumed_after_epoch"] == "0"
    client = MlflowClient()
    lr = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/learning_rate"))
    np.testing.assert_allclose([v for _, v in lr], [0.01] * 3 + [0.001], rtol=1e-6)  # step
    for key in ("val/clean_acc", "val/pgd_acc"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2, 3], key
    plots = [a.path for a in client.list_artifacts(run_id, "plots")]
    assert CURVES_ARTIFACT in plots
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model") is not None

    # once finished, the same command does not start a second long run
    assert cli.main(ARGV) == 2
    _one_line(capsys, "FINISHED already")
    assert len(_runs()) == 1

    # ... and `make champion-ship` registers the run's model, evaluated, then writes it with the
    # card of that version (its test figures) to a shipped folder
    register = ["register", "--run-name", "champ-test", "--clean-floor", "0", *EVAL_NO_AA]
    assert cli.main(register) == 0, capsys.readouterr().err[-3000:]
    version = client.get_model_version_by_alias("robustlab-mnist", "champion")
    assert version.run_id == run_id and "robustlab.test_run_id" in version.tags
    assert cli.main(["register", "--run-name", "champ-test", "--export", str(shipped)]) == 0
    card = (shipped / "CARD.md").read_text()
    assert card.startswith(version.description.rstrip()), card[:500]
    assert mlflow.models.Model.load(str(shipped)).metadata["robustlab"]["run_id"] == run_id
