"""`robustlab tune`: bad input, the simplex, a two-worker smoke study, pruning, a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.cli import main
from robustlab.config import Heartbeat, TuneConfig
from robustlab.data.pools import load_inv_pools
from robustlab.data.tramer_halves import selection_sources, tramer_source_split
from robustlab.tune.budgets import simplex_point
from robustlab.tune.run import run_tune
from tests.conftest import DATA_DIR, REPO

SEL_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_acc", "sel/inv_bal_acc")

# (extra argv, fragment of the one-line error): for the bad-input matrix (tests/test_bad_input.py)
TUNE_BAD_INPUTS = [
    (["--n-trials", "0"], "n_trials must be >= 1"),
    (["--timeout", "0"], "timeout must be > 0"),
    (["--timeout", "-5"], "timeout must be > 0"),
    (["--clean-floor", "1.5"], "clean_floor must lie in [0, 1]"),
    (["--clean-floor", "-0.1"], "clean_floor must lie in [0, 1]"),
    (["--objective", "hypervolume"], "unknown objective"),
    (["--sampler", "cmaes"], "unknown sampler"),
    (["--budget", "huge"], "unknown budget"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--storage", "nosuchdb://x/y"], "cannot open the study storage"),
    (["--storage", "sqlite:////no/such/folder/optuna.db"], "cannot open the study storage"),
]


def _runs(uri: str) -> list:
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # the store was never even opened
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


@pytest.mark.parametrize(("argv", "message"), TUNE_BAD_INPUTS)
def test_bad_input_is_one_line_before_any_run(tracking, tmp_path, capsys, argv, message):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    full = ["tune", "--budget", "smoke", "--storage", storage, *argv]
    assert main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab tune: error: ") and message in err[0]
    assert _runs(tracking) == []
    if "--storage" not in argv:
        assert optuna.get_all_study_names(storage) == []


def test_gp_without_torch_and_a_study_with_other_objectives_are_refused(tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    try:
        import torch  # noqa: F401
    except ImportError:
        assert main(["tune", "--sampler", "gp", "--storage", storage]) == 2
        assert "needs PyTorch" in capsys.readouterr().err
    optuna.create_study(study_name="mine", storage=storage, direction="maximize")
    assert main(["tune", "--study-name", "mine", "--storage", storage, "--budget", "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists with 1 objective(s), not objective=pareto (3)" in err[0]
    assert _runs(tracking) == []


def test_simplex_sampling_is_uniform_on_the_simplex():
    rng = np.random.default_rng(0)
    mix = np.array([simplex_point(rng.uniform(1e-6, 1, 3)) for _ in range(20_000)])
    np.testing.assert_allclose(mix.sum(axis=1), 1.0)
    assert (mix > 0).all()
    # uniform on the 2-simplex: each share ~ Beta(1, 2), mean 1/3 and P(share > 1/2) = 1/4
    np.testing.assert_allclose(mix.mean(axis=0), 1 / 3, atol=0.01)
    np.testing.assert_allclose((mix > 0.5).mean(axis=0), 0.25, atol=0.015)


def _smoke(tmp_path: Path, **kw) -> TuneConfig:
    base = {"budget": "smoke", "data_dir": str(DATA_DIR), "clean_floor": 0.0}
    return TuneConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}", **{**base, **kw})


def _children(parent_id: str) -> list:
    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_two_worker_smoke_study_nests_one_run_per_trial(tracking, tmp_path):
    cfg = _smoke(tmp_path, workers=2, n_trials=3, study_name="smoke2")
    parent_id = run_tune(cfg)
    study = optuna.load_study(study_name="smoke2", storage=cfg.storage)
    trials = study.get_trials()
    assert len(trials) >= 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    children = {r.info.run_id: r for r in _children(parent_id)}
    assert len(children) == len(trials)
    assert sorted(int(r.data.tags["robustlab.trial"]) for r in children.values()) == sorted(
        t.number for t in trials
    )
    client = MlflowClient()
    excluded_sel = selection_sources(DATA_DIR, load_inv_pools(DATA_DIR))
    for t in trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert all(m in run.data.metrics for m in SEL_METRICS)
        assert run.data.metrics["sel/clean_acc"] == pytest.approx(t.values[0])
        assert float(run.data.params["mix_inv"]) == pytest.approx(t.user_attrs["mix_inv"])
        assert run.outputs.model_outputs  # the runner logs the model as a LoggedModel
        excluded = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path="excluded_test_indices.json"
                )
            ).read_text()
        )["indices"]
        assert set(excluded_sel) <= set(excluded)  # selection sources never reach test metrics
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {"trials.csv", "front.csv", "front.md", "selection_split.json", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert "plots/pareto_front.png" in plots and "plots/history_sel_pgd_acc.png" in plots
    split = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent_id, artifact_path="selection_split.json"
            )
        ).read_text()
    )
    assert split["test_indices"] == tramer_source_split(DATA_DIR)[1].tolist()
    # the leader showed its progress on the parent run: every trial complete at the end
    complete = client.get_metric_history(parent_id, "tune/complete")
    assert complete[-1].value == 3 and [m.value for m in complete] == sorted(
        m.value for m in complete
    )


@pytest.mark.slow
def test_scalar_mode_prunes_a_worse_trial_and_ends_its_run(tracking, tmp_path):
    cfg = _smoke(
        tmp_path, objective="scalar", tune_lr=True, clean_floor=1.0, n_trials=1, study_name="s"
    )
    study = optuna.create_study(study_name="s", storage=cfg.storage, direction="maximize")
    good = {"u_clean": 0.02, "u_ptb": 0.9, "u_inv": 0.9, "learning_rate": 3e-3}
    study.enqueue_trial(good)
    run_tune(cfg)
    # the resumed study: one trial that cannot learn in 8 steps (learning rate 1e-4) is pruned
    study.enqueue_trial({**good, "learning_rate": 1e-4})
    parent_id = run_tune(replace(cfg, n_trials=2, timeout=1.0))
    t0, t1 = optuna.load_study(study_name="s", storage=cfg.storage).get_trials()
    assert t0.state == TrialState.COMPLETE and t1.state == TrialState.PRUNED
    assert t1.intermediate_values[0] < t0.intermediate_values[0]
    runs = {r.data.tags["robustlab.trial"]: r for r in _children(parent_id)}
    assert set(runs) == {"0", "1"}  # the resumed study adopted trial 0's run
    assert runs["1"].info.status == "KILLED" and runs["1"].data.tags["robustlab.pruned"] == "true"
    assert runs["0"].info.status == "FINISHED"


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried(tracking, tmp_path):
    cfg = _smoke(tmp_path, n_trials=1, study_name="k", heartbeat=Heartbeat(1, 3))
    # the parent run and the study as `robustlab tune` makes them; its own worker stops at once
    run_tune(replace(cfg, timeout=1e-9))
    study = optuna.load_study(study_name="k", storage=cfg.storage)
    assert study.get_trials() == []
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "robustlab.cli", "tune-worker", "--study-name", "k"]
    cmd += ["--storage", cfg.storage]
    victim = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        running = study.get_trials(states=(TrialState.RUNNING,))
        if running and running[0].user_attrs.get("mlflow_run_id"):
            break
        time.sleep(0.5)
    else:
        victim.kill()
        pytest.fail("the worker never reached its first epoch")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(cfg.heartbeat.grace_period + 1)
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    trials = optuna.load_study(study_name="k", storage=cfg.storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 1
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    done = next(t for t in trials if t.state == TrialState.COMPLETE)
    assert done.params == failed.params  # the same point, retried
    retry_run = MlflowClient().get_run(done.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["robustlab.tune.retry_of"] == str(failed.number)
    lost = MlflowClient().get_run(failed.user_attrs["mlflow_run_id"])
    assert lost.info.status == "RUNNING"  # SIGKILL left it so; the next summary ends it
    run_tune(cfg)  # the study is complete: no new trial, only the summary
    lost = MlflowClient().get_run(failed.user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and lost.data.tags["robustlab.tune.worker_lost"] == "true"
    assert len(optuna.load_study(study_name="k", storage=cfg.storage).get_trials()) == 2


@pytest.mark.slow
def test_trades_beta_is_searched_beside_the_mixture(tracking, tmp_path):
    cfg = _smoke(tmp_path, n_trials=1, study_name="trades", method="trades", tune_beta=True)
    parent_id = run_tune(cfg)
    [trial] = optuna.load_study(study_name="trades", storage=cfg.storage).get_trials()
    assert trial.state == TrialState.COMPLETE and 1.0 <= trial.params["trades_beta"] <= 10.0
    [child] = _children(parent_id)
    assert child.data.params["method"] == "trades"
    assert float(child.data.params["trades_beta"]) == pytest.approx(trial.params["trades_beta"])
