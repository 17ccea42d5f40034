"""Faults on the shared services: a SIGKILLed worker, a killed and restarted MLflow server, a
restarted PostgreSQL, all under running workers (smoke trials, short heartbeats)."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import numpy as np
import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from robustlab import services
from robustlab.launch.launcher import ATTR_PARENT
from tests.conftest import DATA_DIR
from tests.scale_support import (
    machine,
    needs_postgres,
    reap_fixture,  # noqa: F401 - the `reap` fixture
    robustlab,
    running_runs,
    start_services,
    stop_services,
    trial_runs,
    tune_args,
    wait_for_running_trial,
    worker,
)

pytestmark = [
    needs_postgres,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]
retried_trial_number = RetryHeartbeatStaleTrialCallback.retried_trial_number
HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "4")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    started = start_services(tmp_path_factory.mktemp("faults") / "tracking")
    yield started
    stop_services(started)


def _checkpoint_complete(live, run_id: str) -> bool:
    """A checkpoint slot whose state.json (uploaded last) is there."""
    client = live.client()
    slots = client.list_artifacts(run_id, "checkpoint")
    return any(
        a.path.endswith("state.json") for s in slots for a in client.list_artifacts(run_id, s.path)
    )


def test_a_sigkilled_worker_is_retried_and_nothing_stays_running(live, tmp_path, reap):
    name = "killed"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = tune_args(name, 2, *HEARTBEAT)
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)

    (cwd_a, env_a), (cwd_b, env_b) = (machine(tmp_path, f"w{i}", live) for i in "ab")
    victim = worker(name, cwd_a, env_a)
    reap.append(victim)
    lost = wait_for_running_trial(study, victim)  # mid-trial: its run and first epoch exist
    survivor = worker(name, cwd_b, env_b)  # starts up (> grace period) while the victim works
    reap.append(survivor)
    lost_run = lost.user_attrs["mlflow_run_id"]
    deadline = time.time() + 120  # the victim's checkpoint, which the retry continues from
    while not _checkpoint_complete(live, lost_run):
        assert time.time() < deadline and victim.poll() is None, "no checkpoint before the end"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=900) == 0, (cwd_b / "worker.log").read_text()[-3000:]

    trials = optuna.load_study(study_name=name, storage=live.storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1, states
    assert len(trials) == 3  # nothing RUNNING or WAITING left
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert failed.number == lost.number
    retried = [t for t in trials if retried_trial_number(t) == failed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == failed.params  # the same point, re-queued
    fresh = next(t for t in trials if t not in (failed, retried[0]))
    assert fresh.params != failed.params  # the survivor sampled a point of its own

    # the coordinator's summary ends the lost run; no run anywhere stays RUNNING
    summary = robustlab(args, coord, coord_env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    parent = optuna.load_study(study_name=name, storage=live.storage).user_attrs[ATTR_PARENT]
    runs = {r.info.run_id: r for r in trial_runs(live, parent)}
    assert len(runs) == 3
    assert runs[failed.user_attrs["mlflow_run_id"]].info.status == "FAILED"
    assert runs[failed.user_attrs["mlflow_run_id"]].data.tags["robustlab.tune.worker_lost"] == (
        "true"
    )
    retry_run = runs[retried[0].user_attrs["mlflow_run_id"]]
    assert retry_run.info.status == "FINISHED"
    assert retry_run.data.tags["robustlab.tune.retry_of"] == str(failed.number)
    assert retry_run.data.tags["robustlab.resumed_from"] == lost_run  # its checkpoint reused
    assert running_runs(live, name) == []


def test_mlflow_server_and_postgresql_restarts_under_a_running_worker(live, tmp_path, reap):
    name = "restarts"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = tune_args(name, 1, "--heartbeat-interval", "1", "--grace-period", "30")
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)

    # the client retries a dead server (tests/conftest.py turns retries off: on again here)
    cwd, env = machine(
        tmp_path,
        "w",
        live,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="8",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    proc = worker(name, cwd, env)
    reap.append(proc)
    wait_for_running_trial(study, proc)
    svc = live.svc
    pid = int(svc.pid_file.read_text())
    os.killpg(pid, signal.SIGKILL)  # the server dies mid-trial, without warning
    svc.pid_file.unlink()
    services.restart_postgres(svc)  # connections cut under the worker and the server
    time.sleep(3)  # a gap with no server at all
    services.start_mlflow(svc)
    assert proc.wait(timeout=900) == 0, (cwd / "worker.log").read_text()[-3000:]

    trials = optuna.load_study(study_name=name, storage=live.storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE]  # survived: no retry needed
    run = live.client().get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["sel/clean_acc"] == pytest.approx(trials[0].values[0])
    # the trial's model was logged after the outage and loads from the server
    assert run.outputs.model_outputs
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(live.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(before)
    assert model.predict(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
    assert running_runs(live, name) == []


def _experiment_args(name: str) -> list[str]:
    """A smoke experiment of 3 units (vanilla once, invariance on 2 folds), short heartbeats."""
    return [
        "experiment",
        "--budget",
        "smoke",
        "--seeds",
        "1",
        "--regimes",
        "vanilla,invariance",
        "--inv-folds",
        "2",
        "--allow-small-folds",
        "true",
        "--data-dir",
        str(DATA_DIR),
        "--study-name",
        name,
        *HEARTBEAT,
    ]


def test_a_sigkilled_experiment_worker_is_retried_and_counted_once(live, tmp_path, reap):
    name = "exp-killed"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = _experiment_args(name)
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)
    (cwd_a, env_a), (cwd_b, env_b) = (machine(tmp_path, f"w{i}", live) for i in "ab")
    victim = worker(name, cwd_a, env_a, "experiment-worker")
    reap.append(victim)
    lost = wait_for_running_trial(study, victim)  # mid-unit: its run exists
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = worker(name, cwd_b, env_b, "experiment-worker")
    reap.append(survivor)
    assert survivor.wait(timeout=900) == 0, (cwd_b / "worker.log").read_text()[-3000:]

    trials = study.get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1, states
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert failed.number == lost.number
    assert "no heartbeat" in study.user_attrs[f"robustlab_fail_reason_{failed.number}"]
    [retry] = [t for t in trials if retried_trial_number(t) == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params

    # the coordinator summarizes: the lost run ends FAILED, the unit counts once in the tables
    summary = robustlab(args, coord, coord_env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    parent = study.user_attrs[ATTR_PARENT]
    runs = {r.info.run_id: r for r in trial_runs(live, parent)}
    lost_run = runs[failed.user_attrs["mlflow_run_id"]]
    assert lost_run.info.status == "FAILED"
    assert lost_run.data.tags["robustlab.experiment.worker_lost"] == "true"
    assert sorted(r.info.status for r in runs.values()) == ["FAILED"] + ["FINISHED"] * 3
    client = live.client()
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(live.tracking_uri)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{parent}/tables/inv_predictions.csv")
    finally:
        mlflow.set_tracking_uri(before)
    rows = [line.split(",") for line in text.splitlines()[1:]]
    assert len(rows) == 2 * 793  # each example once per regime: the lost unit not counted
    assert client.get_run(parent).info.status == "FINISHED"
    assert running_runs(live, name) == []


def test_a_corrupted_checkpoint_on_a_retried_trial_starts_afresh_and_says_why(live, tmp_path, reap):
    name = "corrupt"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = tune_args(name, 1, *HEARTBEAT)
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)
    (cwd_a, env_a), (cwd_b, env_b) = (machine(tmp_path, f"w{i}", live) for i in "ab")
    victim = worker(name, cwd_a, env_a)
    reap.append(victim)
    lost = wait_for_running_trial(study, victim)
    lost_run = lost.user_attrs["mlflow_run_id"]
    deadline = time.time() + 120
    while not _checkpoint_complete(live, lost_run):
        assert time.time() < deadline and victim.poll() is None, "no checkpoint before the end"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    weights = list((live.folder / "services" / "artifacts").rglob(f"{lost_run}/**/*.weights.h5"))
    assert weights, "the checkpoint's weights were not found in the server's artifact store"
    for path in weights:
        path.write_bytes(b"not an HDF5 file")  # the retry must not continue from this
    # a worker that starts within the grace period rightly samples a new trial (the lost one
    # may still be alive); start the survivor once the lost trial's heartbeat is stale
    time.sleep(float(HEARTBEAT[3]) + 1)
    survivor = worker(name, cwd_b, env_b)
    reap.append(survivor)
    assert survivor.wait(timeout=900) == 0, (cwd_b / "worker.log").read_text()[-3000:]
    log = (cwd_b / "worker.log").read_text()
    [line] = [ln for ln in log.splitlines() if f"retries trial {lost.number}:" in ln]
    assert "starting afresh: no intact checkpoint in run " + lost_run in line
    [retry] = [t for t in study.get_trials() if retried_trial_number(t) == lost.number]
    run = live.client().get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "robustlab.resumed_from" not in run.data.tags
    assert run.data.tags["robustlab.retry_note"] == line.split(": ", 1)[1]


def test_postgresql_down_longer_than_the_grace_period_under_two_workers(live, tmp_path, reap):
    name = "pg-down"
    coord, coord_env = machine(tmp_path, "coordinator", live)
    args = tune_args(name, 3, *HEARTBEAT)
    made = robustlab([*args, "--create-only", "true"], coord, coord_env)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=live.storage)
    places = [
        machine(tmp_path, f"w{i}", live, MLFLOW_HTTP_REQUEST_MAX_RETRIES="8") for i in range(2)
    ]
    procs = [worker(name, cwd, env) for cwd, env in places]
    reap.extend(procs)
    wait_for_running_trial(study, procs[0])
    svc = live.svc
    services.stop_postgres(svc)  # the database is gone for longer than the grace period (4 s)
    time.sleep(10)
    services.start_postgres(svc)
    codes = [p.wait(timeout=900) for p in procs]
    logs = [(cwd / "worker.log").read_text() for cwd, _ in places]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert any("database is unreachable" in log or "heartbeat skipped" in log for log in logs)

    study = optuna.load_study(study_name=name, storage=live.storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 3
    for t in trials:  # COMPLETE once, or FAIL with the reason recorded
        assert t.state in (TrialState.COMPLETE, TrialState.FAIL), t.state
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("robustlab_fail_reason") or study.user_attrs.get(
                f"robustlab_fail_reason_{t.number}"
            ), t.number
    runs = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(runs)) == len(runs)
    assert all(live.client().get_run(r).info.status == "FINISHED" for r in runs)
    summary = robustlab(args, coord, coord_env)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert running_runs(live, name) == []
