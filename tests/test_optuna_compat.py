"""The Optuna private APIs robustlab wraps (robustlab.launch.optuna_compat) still exist and work.

An Optuna upgrade that removes or changes one fails here, by name, instead of in a worker."""

from __future__ import annotations

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from robustlab.launch import optuna_compat as oc


def test_optuna_is_the_minor_version_robustlab_wraps():
    assert optuna.__version__.startswith("5.0."), (
        f"Optuna {optuna.__version__}: robustlab/launch/optuna_compat.py wraps private APIs of "
        "5.0.x; check each wrapper against the new version, then update this pin"
    )


def test_every_wrapped_private_api_works_on_a_real_study(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=2
    )
    study = optuna.create_study(study_name="s", storage=storage)
    assert oc.storage_of(study).get_study_id_from_name("s") == storage.get_study_id_from_name(
        "s"
    ), "Study._storage"
    assert oc.pop_waiting_trial(study) is None, "Study._pop_waiting_trial_id (nothing waits)"
    study.enqueue_trial({"seed": 3})
    trial = oc.pop_waiting_trial(study)
    assert trial is not None, "Study._pop_waiting_trial_id"
    frozen = storage.get_trial(oc.trial_id(trial))
    assert frozen.state == TrialState.RUNNING and frozen.number == trial.number, "Trial._trial_id"
    value = oc.record_enqueued_param(trial, "seed", IntDistribution(0, 5))
    assert value == 3 and storage.get_trial(oc.trial_id(trial)).params == {"seed": 3}, (
        "Trial._suggest"
    )
    study.tell(trial, 1.0)
    assert study.trials[0].state == TrialState.COMPLETE


def test_heartbeat_keeps_a_popped_trial_alive(tmp_path):
    """optuna.storages._heartbeat.get_heartbeat_thread: without it the trial would go stale."""
    import time

    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=1, grace_period=2
    )
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({})
    trial = oc.pop_waiting_trial(study)
    with oc.heartbeat(study, trial):
        time.sleep(3)  # longer than the grace period: alive only if the heartbeat beats
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == TrialState.RUNNING
    time.sleep(3)  # no heartbeat now: the trial goes stale
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.FAIL


def test_a_joiner_takes_over_only_from_a_leader_that_died_with_its_parent_running(
    tracking, tmp_path
):
    """`leader_died`, on a real SQLite study and MLflow store: a leader whose lease stops beating
    while its parent run is RUNNING is dead (the joiner takes over); one that ends its parent run
    is not, however its lease looks afterwards."""
    import time

    import mlflow

    from robustlab.config import Heartbeat
    from robustlab.launch.election import claim
    from robustlab.launch.leader import leader_died

    beat = Heartbeat(1, 3, 1)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s")
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("e")

    lease = claim(study, beat)
    assert lease is not None
    parent = client.create_run(exp).info.run_id  # RUNNING
    lease._stop.set()  # the leader dies (SIGKILL): no more beats, no release
    t0 = time.monotonic()
    assert leader_died(study, parent, beat)  # its lease goes stale, the parent still RUNNING
    assert beat.grace_period - 1 <= time.monotonic() - t0 < 60

    other = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="t")
    with claim(other, beat):  # a live leader, beating, that ends its parent run
        parent2 = client.create_run(exp).info.run_id
        client.set_terminated(parent2, "FINISHED")
        assert not leader_died(other, parent2, beat)


def test_a_leader_releases_its_lease_only_after_its_parent_run_ended(
    tracking, tmp_path, monkeypatch
):
    """`parent_run`: between the lease's release and the parent run's end a joiner would see the
    parent RUNNING with no live leader and take the study over (a second parent run)."""
    from types import SimpleNamespace

    import mlflow

    from robustlab.config import Heartbeat
    from robustlab.launch import launcher
    from robustlab.launch.election import Lease, claim, is_fresh, leader_record

    url = f"sqlite:///{tmp_path / 'o.db'}"
    beat = Heartbeat(1, 3, 1)
    study = optuna.create_study(storage=url, study_name="s")
    plan = SimpleNamespace(
        kind="tune", study_name="s", heartbeat=beat, metric_names=("v",), study_attrs=dict
    )
    seen: list[tuple[str, bool]] = []
    release = Lease.__exit__

    def observed(self, *exc):
        status = mlflow.tracking.MlflowClient().get_run(parent_id).info.status
        seen.append((status, is_fresh(leader_record(study), beat)))
        release(self, *exc)

    monkeypatch.setattr(Lease, "__exit__", observed)
    storage = optuna.storages.RDBStorage(url)
    with launcher.parent_run(
        plan, storage, url, study=study, lease=claim(study, beat), run_name="p", params={}, tags={}
    ) as (parent, _study, _lease):
        parent_id = parent.info.run_id
    assert seen == [("FINISHED", True)]  # the run ended while the lease was still held
    assert not is_fresh(leader_record(study), beat)  # ... and then released
