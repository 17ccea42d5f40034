"""Every command form README.md and docs/ show runs end to end (small slices added).

Covered elsewhere: `mlflow run -e vanilla` (test_e2e_vanilla.py); perturbation chained by
`init_model`, sequential, joint and `experiment budget=smoke` (test_e2e_regimes.py); the
labelling page `label --rater` (test_label_page.py). Here: a training entry point with its
end-of-training evaluation at `pgd_restarts=0`, `mlflow run -e evaluate` and `robustlab evaluate`
(`--pgd-restarts 0`, `--pgd-engine robustlab`, every documented flag), and the invariance
workflow `tracking-init` -> `mlflow run -e generate` -> `label --init-from` -> `label --stats`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab import cli
from robustlab.tracking import ensure_experiment
from tests.conftest import DATA_DIR
from tests.test_e2e_vanilla import mlflow_run

pytestmark = pytest.mark.slow
SMALL = ["train_size=512", "batch_size=64", f"data_dir={DATA_DIR}"]


def _runs() -> list:
    return MlflowClient().search_runs(
        [ensure_experiment("robustlab")], order_by=["attributes.start_time ASC"]
    )


def _json(run_id: str, path: str) -> dict:
    with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One store for the module and one model in it: `mlflow run -e invariance` on 512 images,
    with the end-of-training robustness evaluation at pgd_restarts=0."""
    folder = tmp_path_factory.mktemp("documented")
    (folder / "tracking").mkdir()
    uri = f"sqlite:///{folder / 'tracking' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROBUSTLAB_TRACKING_DIR", str(folder / "tracking"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mlflow.set_tracking_uri(uri)
        ensure_experiment("robustlab")
        out = mlflow_run(
            "invariance",
            folder,
            "epochs=1",
            "eval_size=60",
            "autoattack_size=10",
            "pgd_restarts=0",
            *SMALL,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        [run] = _runs()
        excluded = set(_json(run.info.run_id, "excluded_test_indices.json")["indices"])
        yield SimpleNamespace(
            folder=folder, run=run, model_uri=f"runs:/{run.info.run_id}/model", excluded=excluded
        )


@pytest.fixture(autouse=True)
def _no_inherited_experiment_id(monkeypatch):
    """In-process commands (mlflow.set_experiment) export MLFLOW_EXPERIMENT_ID, which makes a
    later `mlflow run --experiment-name` refuse to start; a user's shell would not have it."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


def test_training_entry_point_evaluates_with_zero_restarts(trained):
    m = trained.run.data.metrics
    assert {"test/clean_acc", "test/pgd40_acc", "test/autoattack_acc"} <= set(m)
    assert not [k for k in m if k.startswith("test/pgd100")]  # R = 0: no PGD-100 metric
    report = _json(trained.run.info.run_id, "evaluation.json")
    assert report["pgd_restarts"] == 0 and "pgd100x0" not in report["attacks"]
    # Square runs inside AutoAttack only; the stand-alone Square is evaluate's
    assert "test/square_acc" not in m and "square" not in report["attacks"]
    assert [s["name"] for s in report["stages"]][:2] == ["pgd40", "autoattack"]
    evaluated = _json(trained.run.info.run_id, "evaluated_test_indices.json")["indices"]
    assert len(evaluated) == 60 and not set(evaluated) & trained.excluded
    assert len(trained.excluded) == 493  # the thesis pool's sources (ties dropped)


def test_mlflow_run_evaluate_with_zero_restarts(trained):
    """docs/evaluation.md: `--pgd-restarts 0` used to die printing its summary (KeyError)."""
    out = mlflow_run(
        "evaluate",
        trained.folder,
        f"model_uri={trained.model_uri}",
        "eval_size=50",
        "autoattack_size=0",
        "eps=0.3",
        "pgd_restarts=0",
        f"data_dir={DATA_DIR}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [summary] = [line for line in out.stdout.splitlines() if line.startswith("evaluate: run ")]
    assert "PGD-40" in summary and "PGD-100" not in summary
    run = next(r for r in _runs() if r.data.tags.get("robustlab.model_uri") == trained.model_uri)
    assert run.info.status == "FINISHED" and summary.startswith(f"evaluate: run {run.info.run_id}")
    assert f"clean {run.data.metrics['test/clean_acc']:.4f}" in summary
    assert not [k for k in run.data.metrics if k.startswith("test/pgd100")]
    evaluated = _json(run.info.run_id, "evaluated_test_indices.json")
    assert evaluated["mnist_split"] == "test" and len(evaluated["indices"]) == 50
    assert not set(evaluated["indices"]) & trained.excluded


def test_robustlab_evaluate_every_documented_flag(trained, capsys):
    argv = [
        "evaluate",
        "--model-uri",
        trained.model_uri,
        "--eval-size",
        "40",
        "--autoattack-size",
        "10",
        "--eps",
        "0.1",
        "--seed",
        "1",
        "--pgd-restarts",
        "2",
        "--batch-size",
        "40",
        "--square-queries",
        "10",
        "--pgd-engine",
        "robustlab",
        "--data-dir",
        str(DATA_DIR),
        "--run-name",
        "documented-flags",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    summary = capsys.readouterr().out
    for part in ("clean", "PGD-40", "PGD-100x2", "AutoAttack", "Square"):
        assert part in summary, summary
    [run] = [r for r in _runs() if r.info.run_name == "documented-flags"]
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "1" and run.data.params["n_eval"] == "40"
    report = _json(run.info.run_id, "evaluation.json")
    assert report["pgd_engine"] == "robustlab" and report["eps"] == pytest.approx(0.1)
    assert report["attacks"]["pgd100x2"]["restarts"] == 2 and report["n_autoattack"] == 10
    assert report["attacks"]["autoattack"]["square_queries"] == 10


def test_generate_then_label_init_from_and_stats(trained, tmp_path, capsys):
    """README: generate candidates, start a label store from them, print its statistics."""
    init = subprocess.run(
        [str(Path(sys.executable).parent / "robustlab"), "tracking-init"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0 and "experiment 'robustlab'" in init.stdout, init.stderr[-2000:]
    out = mlflow_run(
        "generate",
        trained.folder,
        "split=train",
        "start=0",
        "count=2",
        "eps=0.3",
        "norm=linf",
        f"data_dir={DATA_DIR}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    gen = next(r for r in _runs() if "candidates.npz" in _artifacts(r.info.run_id))
    npz = Path(
        mlflow.artifacts.download_artifacts(
            run_id=gen.info.run_id, artifact_path="candidates.npz", dst_path=str(tmp_path)
        )
    )
    with np.load(npz) as z:
        n = len(z["images"])
        assert z["source_split"].tolist() == ["train"] * 2 and z["source_index"].tolist() == [0, 1]
    store = tmp_path / "labels.json"
    capsys.readouterr()
    assert cli.main(["label", "--store", str(store), "--init-from", str(npz)]) == 0
    assert store.is_file()
    assert cli.main(["label", "--store", str(store), "--stats"]) == 0
    stats = capsys.readouterr().out
    assert f"{n} examples, 0 raters" in stats and "no votes yet" in stats


def test_generate_space_separated_eps_and_label_import(trained, tmp_path, capsys):
    """docs/invariance.md: `--eps 0.3 0.4 --out candidates.npz`; `label --import <set>`."""
    out = tmp_path / "candidates.npz"
    argv = ["generate", "--split", "train", "--start", "5", "--count", "1", "--eps", "0.3", "0.4"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["eps"].tolist() == [0.3, 0.4] and z["source_index"].tolist() == [5, 5]
    store = tmp_path / "tramer.json"
    assert cli.main(["label", "--store", str(store), "--import", "tramer_linf_eps0.3"]) == 0
    capsys.readouterr()
    assert cli.main(["label", "--store", str(store), "--stats"]) == 0
    assert "100 examples" in capsys.readouterr().out


def _artifacts(run_id: str) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id)}
