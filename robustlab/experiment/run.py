"""The experiment on the launcher: regimes × seeds as child runs, summarized into a report.

The leading process validates, creates the parent run and an Optuna study with one enqueued trial
per regime × seed, starts worker processes (`robustlab experiment-worker`) that train the pairs,
and summarizes; it never trains (nor imports TensorFlow). Another `robustlab experiment` started
on the same study while a leader is alive joins it as a worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.errors import ConfigError
from robustlab.evaluation.indices import EVALUATED_ARTIFACT
from robustlab.experiment.budgets import DEFAULT_REGIMES, check_budget, parse_regimes, regime_for
from robustlab.experiment.plan import (
    REGIME_ATTR,
    SEED_ATTR,
    TEST_SUBSET_SEED,
    ExperimentPlan,
    indices_digest,
    pair_configs,
    pair_distributions,
    pair_of,
    release,
    shared_test_indices,
)
from robustlab.experiment.summary import summarize
from robustlab.launch.launcher import (
    RUN_ATTR,
    announce,
    check_existing,
    complete_runs,
    drive,
    elect,
    end_lost_runs,
    finished_children,
    parent_run,
    wait_for_leader,
    work,
    worker_command,
    worker_env,
)
from robustlab.launch.storage import (
    STORAGE_ENV,
    Heartbeat,
    load_existing,
    open_storage,
    redact_url,
    storage_url,
)
from robustlab.tracking import configure_tracking


def run_experiment(
    budget: str = "default",
    seeds: int = 3,
    regimes: str = "",
    data_dir: str | None = None,
    eps: float = 0.3,
    resume_run_id: str | None = None,
    *,
    workers: int = 1,
    pairs_per_worker: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    create_only: bool = False,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    max_retry: int = 2,
) -> str:
    """Run every regime × seed as a child run, then log the comparison and report on the parent.

    The pairs are the enqueued trials of an Optuna study on `storage` (the argument, else
    $ROBUSTLAB_OPTUNA_STORAGE, else tracking/optuna.db), named `study_name` (default
    `experiment-<parent run id>`); `workers` local `robustlab experiment-worker` processes (a
    fresh one per `pairs_per_worker` pairs: memory stays bounded) train them, and workers on
    other machines may join. This process never trains. `create_only`: create the parent run and
    the study, train nothing. An existing `study_name` (same budget, eps, regimes, seeds) is
    resumed: a new parent adopts its COMPLETE pairs, and the missing ones are trained.
    `resume_run_id`: an earlier experiment's parent run (same budget and eps) whose FINISHED
    children are adopted instead of trained again.
    """
    b = check_budget(budget)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if workers < 1 or pairs_per_worker < 1:
        raise ConfigError(
            f"workers and pairs_per_worker must be >= 1, got {workers} and {pairs_per_worker}"
        )
    heartbeat = Heartbeat(heartbeat_interval, grace_period, max_retry).validate()
    labels = parse_regimes(regimes) if regimes else list(DEFAULT_REGIMES)
    plans = [(label, *regime_for(label, b)) for label in labels]  # validates every regime
    pair_configs(b, 0, data_dir, eps, check_model=False)  # the parent never imports TensorFlow
    label_sources = sorted({s for _, _, s in plans})
    test_indices = shared_test_indices(set(label_sources), b.eval_size, data_dir)
    digest = indices_digest(test_indices)
    plan = ExperimentPlan(
        budget,
        eps,
        tuple(labels),
        seeds,
        tuple(label_sources),
        digest,
        len(test_indices),
        heartbeat,
        study_name=study_name or "",
        data_dir=data_dir,
    )
    url = storage_url(storage)
    store = open_storage(url)
    old_study = check_existing(store, plan) if study_name else None
    done = adoptable_children(resume_run_id, budget, eps, digest) if resume_run_id else {}
    configure_tracking()
    if study_name:
        study, token = elect(store, plan)
        if token is None:
            return _join(study, store, plan, url)
    else:  # a fresh study named after the parent run, created inside it
        study, token = None, None
    params = {
        "budget": budget,
        "seeds": seeds,
        "regimes": ",".join(labels),
        "eps": eps,
        **vars(b),
        "test_subset_seed": TEST_SUBSET_SEED,
        "n_test": len(test_indices),
        "test_indices_sha": digest,
    }
    tags = {"robustlab.kind": "experiment"}
    if resume_run_id:
        tags["robustlab.resumed_from"] = resume_run_id
    if old_study is not None:
        tags["robustlab.resumed_study"] = "true"
    with parent_run(
        plan,
        store,
        url,
        study=study,
        token=token,
        run_name=f"experiment-{budget}",
        params=params,
        tags=tags,
    ) as (parent, study):
        mlflow.log_dict({"mnist_split": "test", "indices": list(test_indices)}, EVALUATED_ARTIFACT)
        _adopt_resumed(study, plan, done, resume_run_id, parent.info.run_id)
        plan.enqueue_missing(study)
        announce(study, parent)
        if create_only:
            print(
                f"experiment study {plan.study_name} created (parent run {parent.info.run_id}); "
                f"train its pairs from any machine with: robustlab experiment-worker --study-name "
                f"{plan.study_name} (the storage URL in ${STORAGE_ENV}), then "
                "summarize with the same robustlab experiment command plus --study-name "
                f"{plan.study_name}",
                file=sys.stderr,
            )
            return parent.info.run_id
        t0 = time.perf_counter()
        _drive(study, plan, url, workers, data_dir, pairs_per_worker)
        mlflow.log_metrics({"experiment/wall_seconds": time.perf_counter() - t0, **_peak_rss_mb()})
        runs = complete_runs(study, pair_of)
        end_lost_runs(study, set(runs.values()), "robustlab.experiment.worker_lost")
        summarize(parent.info.run_id, plan, runs)
        return parent.info.run_id


def _join(study: optuna.Study, store, plan: ExperimentPlan, url: str) -> str:
    """Another `robustlab experiment` leads this study: train its pairs as a worker, then exit."""
    parent = wait_for_leader(study, store)
    print(
        f"experiment: study {plan.study_name} is led by another robustlab experiment (parent "
        f"run {parent}); joining it as a worker",
        file=sys.stderr,
        flush=True,
    )
    n = run_worker(plan.study_name, url, plan.data_dir)
    print(
        f"experiment: this worker trained {n} pair(s); the leading process summarizes the "
        f"experiment on parent run {parent}",
        file=sys.stderr,
    )
    return parent


def _adopt_resumed(
    study: optuna.Study,
    plan: ExperimentPlan,
    done: dict[tuple[str, int], Run],
    old_parent: str | None,
    parent_id: str,
) -> None:
    """The FINISHED children of a resumed experiment become COMPLETE trials of this study."""
    client = MlflowClient()
    complete = complete_runs(study, pair_of)
    for (label, seed), old in done.items():
        if (label, seed) not in set(plan.pairs):
            continue
        print(
            f"== experiment: {label} seed {seed}: reusing run {old.info.run_id} ==",
            file=sys.stderr,
            flush=True,
        )
        client.set_tag(old.info.run_id, "robustlab.moved_from_parent", old_parent)
        client.set_tag(old.info.run_id, "mlflow.parentRunId", parent_id)
        if (label, seed) in complete:
            continue
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[((old.info.end_time or old.info.start_time) - old.info.start_time) / 1000],
                params={"regime": label, "seed": seed},
                distributions=pair_distributions(plan.regimes, plan.seeds),
                user_attrs={
                    REGIME_ATTR: label,
                    SEED_ATTR: seed,
                    RUN_ATTR: old.info.run_id,
                    "adopted_from": old.data.tags.get("mlflow.parentRunId", ""),
                },
            )
        )


def _drive(
    study: optuna.Study,
    plan: ExperimentPlan,
    url: str,
    workers: int,
    data_dir: str | None,
    pairs_per_worker: int,
) -> None:
    """Keep up to `workers` worker processes (each exits after `pairs_per_worker` pairs) busy
    until every pair is COMPLETE."""
    env = worker_env(url)
    args = ["--max-trials", str(pairs_per_worker)]
    if data_dir:
        args += ["--data-dir", data_dir]
    cmd = worker_command("experiment-worker", plan.study_name, *args)
    drive(
        study,
        plan,
        lambda _i: subprocess.Popen(cmd, env=env),
        workers=workers,
        demand=plan.demand,
        max_failures=2 * len(plan.pairs),
    )


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest worker it started (Linux: KiB)."""
    import resource

    return {
        "experiment/parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "experiment/worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        / 1024,
    }


def adoptable_children(
    parent_id: str, budget: str, eps: float, test_indices_sha: str | None = None
) -> dict[tuple[str, int], Run]:
    """The FINISHED regime × seed children of experiment `parent_id`, checked to be comparable.

    With `test_indices_sha`, the earlier experiment must have evaluated on the same test images.
    """
    configure_tracking()  # before the parent run exists: look in the same store it will use
    parent, children = finished_children(parent_id, "resume_run_id")
    p = parent.data.params
    if parent.data.tags.get("robustlab.kind") != "experiment":
        raise ConfigError(f"resume_run_id={parent_id} is not an experiment's parent run")
    if p.get("budget") != budget or float(p.get("eps", "nan")) != eps:
        raise ConfigError(
            f"resume_run_id={parent_id} ran budget={p.get('budget')} eps={p.get('eps')}; "
            f"resume it with the same budget and eps (asked: budget={budget} eps={eps})"
        )
    if test_indices_sha is not None and p.get("test_indices_sha") != test_indices_sha:
        raise ConfigError(
            f"resume_run_id={parent_id} evaluated on other test images than this experiment "
            "would (it predates the shared test set, or its data differ); start a new experiment"
        )
    return {
        (c.data.tags["robustlab.experiment_regime"], int(c.data.tags["robustlab.seed"])): c
        for c in children
        if "robustlab.experiment_regime" in c.data.tags and "robustlab.seed" in c.data.tags
    }


def run_worker(study_name: str, url: str, data_dir: str | None = None, max_trials: int = 0) -> int:
    """Train WAITING pairs until none is left (or `max_trials` were done); the number done."""
    store = open_storage(url)
    study = load_existing(store, study_name)
    if study is None:
        raise ConfigError(
            f"no study {study_name!r} in {redact_url(url)}; create it with "
            "robustlab experiment --create-only true (or check the storage URL)"
        )
    plan = ExperimentPlan.from_study(study, data_dir)
    os.environ.pop("MLFLOW_RUN_ID", None)  # it would override the child runs' parent
    configure_tracking()
    study = optuna.load_study(study_name=study_name, storage=open_storage(url, plan.heartbeat))
    return work(study, plan, max_trials=max_trials, after_trial=release)
