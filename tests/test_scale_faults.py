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
