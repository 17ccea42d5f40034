"""`robustlab carry`: an interrupted champion-style run exported from one store, imported into a
fresh one (another machine's), and resumed there by the same `--auto-resume` command, continues
exactly as it would have in its own store; altered bundles and finished runs are refused."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab import cli
from robustlab.provenance import require_provenance
from robustlab.tracking import load_keras_model
from robustlab.train import runner
from robustlab.train.carry import CARRIED_TAG
from tests.test_champion import ARGV


def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _use_store(monkeypatch, folder) -> None:
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("ROBUSTLAB_TRACKING_DIR", str(folder))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def _last_line(capsys, stream: str = "err") -> str:
    return getattr(capsys.readouterr(), stream).strip().splitlines()[-1]


def test_a_carried_run_resumes_in_another_store_as_in_its_own(
    tracking, tmp_path, monkeypatch, capsys
):
    real = runner.log_checkpoint

    def stop_after_second(folder, run_id):  # the machine goes away once epoch 2 is saved
        real(folder, run_id)
        if json.loads((folder / "state.json").read_text())["global_epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "log_checkpoint", stop_after_second)
    assert cli.main(ARGV) == 130
    monkeypatch.setattr(runner, "log_checkpoint", real)
    [interrupted] = _runs()
    original = interrupted.info.run_id
    bundle = tmp_path / "bundle"
    assert cli.main(["carry", "export", "--run-name", "champ-test", "--out", str(bundle)]) == 0
    assert "(epoch 2 done)" in _last_line(capsys, "out")
    assert not (bundle / "artifacts" / "checkpoint").exists()  # only the newest checkpoint

    # the reference: the same command resumes it in its own store
    assert cli.main(ARGV) == 0, capsys.readouterr().err[-3000:]
    here = load_keras_model(f"runs:/{original}/model").get_weights()
    here_val = _history(original, "val/pgd_acc")
    assert len(_runs()) == 1

    # another machine: a fresh store, the bundle imported (twice: the second does nothing)
    _use_store(monkeypatch, tmp_path / "elsewhere")
    assert cli.main(["carry", "import", str(bundle)]) == 0
    assert "imported as run" in _last_line(capsys, "out")
    assert cli.main(["carry", "import", str(bundle)]) == 0
    assert "already in this store" in _last_line(capsys, "out")
    [carried] = _runs()
    assert carried.info.run_id != original and carried.info.status == "KILLED"
    assert carried.data.tags[CARRIED_TAG] == original
    assert len(carried.inputs.dataset_inputs) == len(interrupted.inputs.dataset_inputs) == 3

    assert cli.main(ARGV) == 0, capsys.readouterr().err[-3000:]
    [done] = _runs()
    assert done.info.run_id == carried.info.run_id and done.info.status == "FINISHED"
    assert done.data.tags["robustlab.resumed_after_epoch"] == "1"
    there_val = _history(done.info.run_id, "val/pgd_acc")
    assert [s for s, _ in there_val] == [0, 1, 2, 3]
    np.testing.assert_allclose([v for _, v in there_val], [v for _, v in here_val], atol=1e-6)
    there = load_keras_model(f"runs:/{done.info.run_id}/model").get_weights()
    for a, b in zip(here, there, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the excluded sources came along: the carried model's provenance is found, not unknown
    assert require_provenance(f"runs:/{done.info.run_id}/model", False, "--x").known

    # once finished, the bundle is not imported again, and a finished run is not exported
    assert cli.main(["carry", "import", str(bundle)]) == 0
    assert "already in this store" in _last_line(capsys, "out") and len(_runs()) == 1
    args = ["carry", "export", "--run-id", done.info.run_id, "--out", str(tmp_path / "again")]
    assert cli.main(args) == 2
    assert "FINISHED" in _last_line(capsys) and not (tmp_path / "again").exists()

    # an altered bundle: one line naming the file, nothing created in a third store
    _use_store(monkeypatch, tmp_path / "third")
    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    weights = altered / "checkpoint" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert cli.main(["carry", "import", str(altered)]) == 2
    line = _last_line(capsys)
    assert line.startswith("robustlab carry: error:") and "model.weights.h5" in line, line
    assert _runs() == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["carry", "export", "--run-name", "nothing", "--out", "x"], "no unfinished run"),
        (["carry", "export", "--run-id", "0123abcd", "--out", "x"], "no such run"),
        (["carry", "export", "--run-name", "a", "--run-id", "b", "--out", "x"], "one of"),
        (["carry", "import"], "one bundle folder"),
        (["carry", "import", "/nonexistent/bundle"], "no run.json"),
    ],
)
def test_bad_carry_arguments_are_one_line(tracking, capsys, argv, fragment):
    assert cli.main(argv) == 2
    line = _last_line(capsys)
    assert line.startswith("robustlab carry: error:") and fragment in line, line
    assert _runs() == []
