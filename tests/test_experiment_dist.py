"""The experiment's study: one enqueued trial per (regime, seed, fold) unit, workers that pop only
those.

Fast checks on a SQLite study (no training); the end-to-end runs are in test_e2e_regimes.py
(one process, `mlflow run`) and test_scale_out.py (two workers, PostgreSQL + MLflow server).
"""

from __future__ import annotations

import json

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.cli import main
from robustlab.experiment.plan import FOLD_ATTR, REGIME_ATTR, SEED_ATTR
from robustlab.launch.launcher import ATTR_EXPERIMENT, ATTR_PARENT
from robustlab.tune.plan import ATTR_CONFIG
from tests.conftest import DATA_DIR


def _experiment(storage: str, *extra: str) -> list[str]:
    return [
        "experiment",
        "--budget",
        "smoke",
        "--seeds",
        "2",
        "--regimes",
        "vanilla,joint",
        "--data-dir",
        str(DATA_DIR),
        "--storage",
        storage,
        "--study-name",
        "e1",
        "--inv-folds",
        "2",
        "--allow-small-folds",
        "true",
        *extra,
    ]


def _runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_create_only_enqueues_each_pair_once_and_workers_never_add_trials(
    tracking, tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(_experiment(storage, "--create-only", "true")) == 0
    study = optuna.load_study(study_name="e1", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.WAITING] * 6
    units = sorted(
        (t.user_attrs[REGIME_ATTR], t.user_attrs[SEED_ATTR], t.user_attrs[FOLD_ATTR])
        for t in trials
    )  # joint trains on invariance examples: once per fold; vanilla once per seed (fold -1)
    assert units == [
        ("joint", 0, 0),
        ("joint", 0, 1),
        ("joint", 1, 0),
        ("joint", 1, 1),
        ("vanilla", 0, -1),
        ("vanilla", 1, -1),
    ]
    [parent] = _runs()  # the parent only: no pair was trained
    assert parent.data.tags["robustlab.study"] == "e1"
    assert study.user_attrs[ATTR_PARENT] == parent.info.run_id

    # again: a new parent takes the study over, the WAITING pairs are not enqueued twice
    assert main(_experiment(storage, "--create-only", "true")) == 0
    assert len(study.get_trials()) == 6
    assert len(_runs()) == 2 and study.user_attrs[ATTR_PARENT] != parent.info.run_id

    # the same study with another plan: one line, nothing written
    assert main(_experiment(storage, "--seeds", "3", "--create-only", "true")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("robustlab experiment: error: ") and "exists with seeds=2" in err
    assert len(_runs()) == 2 and len(study.get_trials()) == 6

    # a trial that is not one of the pairs is ended FAIL (not COMPLETE) without training; with
    # no WAITING trial left the worker exits 0 and creates none (study.ask() would)
    for t in study.get_trials(states=(TrialState.WAITING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    study.enqueue_trial({"x": 1.0})
    assert main(["experiment-worker", "--study-name", "e1", "--storage", storage]) == 0
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL] * 7
    assert "not an enqueued unit, ended FAIL" in capsys.readouterr().err
    assert len(_runs()) == 2


def test_a_worker_on_an_unknown_or_tune_study_is_one_line(tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune = optuna.create_study(study_name="t1", storage=storage, directions=["maximize"] * 3)
    tune.set_user_attr(ATTR_PARENT, "0" * 32)
    tune.set_user_attr(ATTR_EXPERIMENT, "0")
    tune.set_user_attr(ATTR_CONFIG, json.dumps({"objective": "pareto"}))
    tune.enqueue_trial({"mix_clean": 0.5})
    for name, message in (
        ("t1", "study 't1' is not a robustlab experiment study (a tune study: join it with "),
        ("nosuch", "no study 'nosuch' in sqlite:///"),
    ):
        argv = ["experiment-worker", "--study-name", name, "--storage", storage]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("robustlab experiment-worker: error: ")
        assert message in err[0]
    assert [t.state for t in tune.get_trials()] == [TrialState.WAITING]  # untouched
    # and the experiment refuses a tune study's name before any run exists
    argv = _experiment(storage, "--create-only", "true")
    argv[argv.index("e1")] = "t1"
    assert main(argv) == 2
    assert "study 't1' exists and is not an experiment study" in capsys.readouterr().err
    assert _runs() == []
