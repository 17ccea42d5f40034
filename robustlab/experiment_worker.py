"""One experiment worker: train the regime × seed pairs enqueued in an experiment's Optuna study.

The study (see `robustlab.experiment`) holds one WAITING trial per pair. A worker pops WAITING
trials only (never asks the sampler for a new point), trains the pair through `run_training` as a
child run of the experiment's parent run, records the run id on the trial and tells it COMPLETE.
Heartbeats get the pair of a worker that died retried with the same parameters. A worker that
finds no WAITING trial exits; `max_trials` makes it exit after that many pairs (the experiment
starts a fresh process per pair, so that no process keeps a model, graph or dataset it no longer
needs).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import cache

import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from robustlab.config import TuneConfig
from robustlab.errors import ConfigError, DataError
from robustlab.tune.study import ATTR_EXPERIMENT, ATTR_PARENT, _redact, open_storage

ATTR_KIND = "robustlab_kind"
ATTR_PLAN = "robustlab_experiment"  # JSON: budget, eps, regimes, seeds, test set, heartbeats
KIND = "experiment"
REGIME_ATTR = "experiment_regime"
SEED_ATTR = "experiment_seed"
RUN_ATTR = "mlflow_run_id"


@dataclass(frozen=True)
class Plan:
    """What every worker reads from an experiment study's user attributes."""

    study_name: str
    parent_run_id: str
    experiment_id: str
    budget: str
    eps: float
    regimes: tuple[str, ...]
    seeds: int
    label_sources: tuple[str, ...]
    test_indices_sha: str
    heartbeat: TuneConfig  # heartbeat_interval, grace_period, max_retry (tune's storage settings)


def load_plan(study_name: str, url: str) -> Plan:
    """The experiment study's plan; ConfigError for an unknown or a non-experiment study."""
    storage = open_storage(url)
    if study_name not in {s.study_name for s in storage.get_all_studies()}:
        raise ConfigError(
            f"no study {study_name!r} in {_redact(url)}; create it with "
            "robustlab experiment --create-only true (or check --storage)"
        )
    attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    if attrs.get(ATTR_KIND) != KIND or ATTR_PLAN not in attrs:
        raise ConfigError(
            f"study {study_name!r} is not a robustlab experiment study"
            + (
                " (a tune study: join it with robustlab tune-worker)"
                if ATTR_PARENT in attrs
                else ""
            )
        )
    p = json.loads(attrs[ATTR_PLAN])
    heartbeat = TuneConfig(
        heartbeat_interval=p["heartbeat_interval"],
        grace_period=p["grace_period"],
        max_retry=p["max_retry"],
    )
    return Plan(
        study_name,
        attrs[ATTR_PARENT],
        attrs[ATTR_EXPERIMENT],
        p["budget"],
        float(p["eps"]),
        tuple(p["regimes"].split(",")),
        int(p["seeds"]),
        tuple(p["label_sources"]),
        p["test_indices_sha"],
        heartbeat,
    )


def pair_distributions(regimes: tuple[str, ...], seeds: int) -> dict:
    """The trials' two params (one distribution each per study: Optuna refuses categorical
    choices that differ between trials)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    return {"regime": CategoricalDistribution(regimes), "seed": IntDistribution(0, seeds - 1)}


@cache
def _test_indices(label_sources: tuple[str, ...], eval_size: int, data_dir: str | None, sha: str):
    """The experiment's shared test images, recomputed from this machine's data and checked
    against the digest the experiment recorded (other data would compare other images)."""
    from robustlab.experiment import indices_digest, shared_test_indices

    indices = shared_test_indices(set(label_sources), eval_size, data_dir)
    if indices_digest(indices) != sha:
        raise DataError(
            f"this machine's MNIST or invariance data give other shared test images (digest "
            f"{indices_digest(indices)}) than the experiment's ({sha}); use the same data files"
        )
    return indices


def run_worker(study_name: str, url: str, data_dir: str | None = None, max_trials: int = 0) -> int:
    """Train WAITING pairs until none is left (or `max_trials` were done); the number done."""
    plan = load_plan(study_name, url)
    os.environ.pop("MLFLOW_RUN_ID", None)  # it would override the child runs' parent
    from robustlab.tracking import configure_tracking

    configure_tracking()
    study = optuna.load_study(study_name=study_name, storage=open_storage(url, plan.heartbeat))
    done = 0
    while not max_trials or done < max_trials:
        fail_stale_trials(study)  # a dead worker's pair comes back WAITING (same params)
        # pops a WAITING trial atomically; unlike study.ask() it never creates a new trial
        trial_id = study._pop_waiting_trial_id()
        if trial_id is None:
            break
        if _run_pair(study, trial_id, plan, data_dir):
            done += 1
            _release()
    return done


def _run_pair(study: optuna.Study, trial_id: int, plan: Plan, data_dir: str | None) -> bool:
    """Train the pair of trial `trial_id` (popped, RUNNING); False when it is not a pair."""
    storage = study._storage
    frozen = storage.get_trial(trial_id)
    label, seed = frozen.user_attrs.get(REGIME_ATTR), frozen.user_attrs.get(SEED_ATTR)
    if label is None or seed is None:  # not one of the experiment's enqueued pairs
        study.tell(frozen.number, state=TrialState.FAIL)  # tell() takes the trial's number
        print(f"trial {frozen.number}: not an enqueued pair, ended FAIL", file=sys.stderr)
        return False
    trial = optuna.Trial(study, trial_id)
    for name, dist in pair_distributions(plan.regimes, plan.seeds).items():
        trial._suggest(name, dist)  # the enqueued value, recorded as the trial's param
    with get_heartbeat_thread(trial_id, storage):
        try:
            t0 = time.perf_counter()
            run_id = train_pair(plan, label, int(seed), frozen, trial, data_dir)
            seconds = time.perf_counter() - t0
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr(RUN_ATTR, run_id)
        study.tell(trial, [seconds])
    print(
        f"trial {frozen.number}: {label} seed {seed} -> run {run_id} ({seconds:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return True


def train_pair(
    plan: Plan,
    label: str,
    seed: int,
    frozen: optuna.trial.FrozenTrial,
    trial: optuna.Trial,
    data_dir: str | None,
) -> str:
    """Train and evaluate one regime × seed as a child of the experiment's parent run."""
    import mlflow

    from robustlab.experiment import BUDGETS, _config, regime_for
    from robustlab.train.runner import Extras, run_training
    from robustlab.tune.objective import _checkpointed_run

    b = BUDGETS[plan.budget]
    regime, label_source = regime_for(label, b)
    test_indices = _test_indices(plan.label_sources, b.eval_size, data_dir, plan.test_indices_sha)
    retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    # a retried pair inherits the lost trial's run id: continue from its checkpoint if intact
    resume = _checkpointed_run(frozen.user_attrs.get(RUN_ATTR)) if retry_of is not None else None
    cfg, ev = _config(b, seed, data_dir, plan.eps)
    cfg = replace(
        cfg, train=replace(cfg.train, epochs=regime.phases[0].epochs, resume_run_id=resume)
    )
    tags = {
        "robustlab.experiment_regime": label,
        "robustlab.seed": str(seed),
        "robustlab.study": plan.study_name,
        "robustlab.trial": str(frozen.number),
    }
    if retry_of is not None:
        tags["robustlab.experiment.retry_of"] = str(retry_of)
    seen: list[str] = []

    def on_epoch(metrics: dict[str, float], step: int) -> None:
        if not seen:  # the run id on the trial as soon as the run exists (a lost run is found)
            seen.append(mlflow.active_run().info.run_id)
            trial.set_user_attr(RUN_ATTR, seen[0])

    import psutil

    started = time.time() - psutil.Process().create_time()  # imports, data, test set
    print(
        f"== experiment: {label} seed {seed} ({started:.1f} s since the worker started) ==",
        file=sys.stderr,
        flush=True,
    )
    return run_training(
        regime,
        cfg,
        ev,
        Extras(
            inv_label_source=label_source,
            all_curves=True,
            run_name=f"{label}-seed{seed}",
            parent_run_id=plan.parent_run_id,
            experiment_id=plan.experiment_id,
            tags=tags,
            test_indices=test_indices,
            on_epoch=on_epoch,
        ),
    )


def _release() -> None:
    """Drop what one pair left behind: Keras' graph state, cached attack graphs, garbage."""
    import keras

    from robustlab.attacks import tf_attacks

    tf_attacks._ATTACKS.clear()
    keras.backend.clear_session()
    gc.collect()
