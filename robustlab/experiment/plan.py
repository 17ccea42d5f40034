"""The experiment plan: which (regime, seed, fold) units an experiment trains, as a launcher plan.

Every human-labelled invariance example is predicted out of fold: the pool
(`robustlab.data.folds`) is split into K source-grouped folds; a regime that trains on invariance
examples is trained once per fold (on the other folds, validated on sources carved from them) and
predicts the held-out fold; a regime that trains on none is trained once per seed (fold -1) and
predicts every example. Every unit is judged on the same test images: the MNIST test set minus
every invariance source, with the AutoAttack and ε-curve subsets fixed per experiment.

An experiment's study holds one enqueued (WAITING) trial per unit. A worker pops WAITING trials
only (never asks the sampler for a new point), trains the unit through `run_training` as a child
run of the experiment's parent run, records the run id on the trial and tells it COMPLETE.
Heartbeats get the unit of a worker that died retried with the same parameters.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from robustlab.config import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    MixConfig,
    RunConfig,
    TrainConfig,
    pgd_step_size,
)
from robustlab.data.folds import (
    HUMAN_SETS,
    FoldAssignment,
    HumanPool,
    assign_folds,
    fold_pools,
    load_human_pool,
)
from robustlab.errors import ConfigError, DataError
from robustlab.evaluation.indices import indices_digest
from robustlab.experiment.budgets import (
    BUDGETS,
    FIRST_PHASE_FROM,
    Budget,
    regime_for,
    train_sets_for,
)
from robustlab.launch import optuna_compat
from robustlab.launch.election import ATTR_LEADER
from robustlab.launch.launcher import (
    ATTR_KIND,
    ATTR_PARENT,
    RUN_ATTR,
    Retry,
    RunOnTrial,
    parent_ids,
    retry_tags,
)
from robustlab.launch.storage import Heartbeat

KIND = "experiment"
ATTR_PLAN = "robustlab_experiment"  # JSON: budget, eps, regimes, seeds, folds, test set, beats
REGIME_ATTR = "experiment_regime"
SEED_ATTR = "experiment_seed"
FOLD_ATTR = "experiment_fold"
NO_FOLD = -1  # a regime that trains on no invariance example: one model per seed
TEST_SUBSET_SEED = 0  # the experiment's test subsets are fixed per experiment, not per seed
Unit = tuple[str, int, int]  # (regime label, seed, fold)


def pair_configs(
    b: Budget, seed: int, data_dir: str | None, eps: float, check_model: bool = True
) -> tuple[RunConfig, EvalConfig]:
    """One unit's configuration (`check_model=False`: no Keras import, for the parent). The
    evaluation's subsets are drawn with TEST_SUBSET_SEED: the same images for every unit."""
    attack = AttackConfig(
        eps=eps, steps=b.attack_steps, step_size=pgd_step_size(eps, b.attack_steps), eps_warmup=1.0
    )
    cfg = RunConfig(
        DataConfig(data_dir, b.train_size, b.eval_size),
        TrainConfig(epochs=b.epochs, batch_size=b.batch_size, seed=seed, patience=b.patience),
        MixConfig(),
        attack,
    )
    ev = EvalConfig(
        eps=eps,
        eval_size=b.eval_size,
        pgd_size=b.pgd_size,
        autoattack_size=b.autoattack_size,
        pgd_restarts=b.pgd_restarts,
        seed=seed,
        subset_seed=TEST_SUBSET_SEED,
        curve_size=b.curve_size,
        curve_points=b.curve_points,
        square_queries=b.square_queries,
        square_alone=b.square_alone,
        pgd_engine=b.pgd_engine,
    )
    return cfg.validate(check_model), ev.validate()


def invariance_sources(data_dir: str | None) -> np.ndarray:
    """Every MNIST test image that is the source of a human-labelled invariance example
    (rater ties included: an image that one set used is excluded from every test)."""
    from robustlab.data.invariance import load_invariance_set

    return np.unique(
        np.concatenate([load_invariance_set(n, data_dir).source_index for n in HUMAN_SETS])
    ).astype(np.int64)


def shared_test_indices(eval_size: int, data_dir: str | None) -> tuple[int, ...]:
    """The MNIST test images every unit of one experiment is evaluated on: the test set minus
    every invariance source, then a subset of `eval_size` (0 = all) seeded by TEST_SUBSET_SEED."""
    from robustlab.data.mnist import Split, load_raw_mnist, subsample

    raw = load_raw_mnist(data_dir)  # the indices need no pixels: skip the float32 copy
    n_test = raw.y_test.shape[0]
    test = Split(np.empty((n_test, 0), np.uint8), raw.y_test, "test", np.arange(n_test))
    del raw
    test = test.without_sources(invariance_sources(data_dir))
    test = subsample(test, eval_size, seed=TEST_SUBSET_SEED)
    return tuple(int(i) for i in test.source_index)


def unit_distributions(regimes: tuple[str, ...], seeds: int, folds: int) -> dict:
    """The trials' params (one distribution each per study: Optuna refuses categorical choices
    that differ between trials)."""
    return {
        "regime": CategoricalDistribution(regimes),
        "seed": IntDistribution(0, seeds - 1),
        "fold": IntDistribution(NO_FOLD, folds - 1),
    }


def unit_of(trial: optuna.trial.FrozenTrial) -> Unit | None:
    attrs = trial.user_attrs
    label, seed, fold = attrs.get(REGIME_ATTR), attrs.get(SEED_ATTR), attrs.get(FOLD_ATTR)
    return None if label is None or seed is None or fold is None else (label, int(seed), int(fold))


@cache
def _checked_cv(
    data_dir: str | None, sets: tuple[str, ...], k: int, seed: int, allow: bool, digest: str
) -> tuple[HumanPool, FoldAssignment]:
    """The pool and its folds, recomputed from this machine's data and checked against the
    digest the experiment recorded (other data would give other folds)."""
    pool = load_human_pool(data_dir, sets)
    folds = assign_folds(pool, k, seed, allow_small_folds=allow)
    if folds.digest != digest:
        raise DataError(
            f"this machine's invariance data give other folds (digest {folds.digest}) than the "
            f"experiment's ({digest}); use the same data files"
        )
    return pool, folds


@cache
def _checked_test_indices(eval_size: int, data_dir: str | None, sha: str) -> tuple[int, ...]:
    """The experiment's shared test images, recomputed and checked against its digest."""
    indices = shared_test_indices(eval_size, data_dir)
    if indices_digest(indices) != sha:
        raise DataError(
            f"this machine's MNIST or invariance data give other shared test images (digest "
            f"{indices_digest(indices)}) than the experiment's ({sha}); use the same data files"
        )
    return indices


@dataclass
class ExperimentPlan:
    """An experiment study as a launcher plan (the leader builds it from its arguments, a worker
    from the study's attributes with `from_study`)."""

    budget: str
    eps: float
    regimes: tuple[str, ...]
    seeds: int
    inv_folds: int
    inv_sets: tuple[str, ...]
    fold_seed: int
    allow_small_folds: bool
    fold_digest: str
    test_indices_sha: str
    n_test: int
    heartbeat: Heartbeat
    study_name: str = ""
    data_dir: str | None = None
    parent_run_id: str = ""
    experiment_id: str = ""
    kind: str = field(default=KIND, init=False)
    directions: tuple[str, ...] = field(default=("minimize",), init=False)
    metric_names: tuple[str, ...] = field(default=("train_seconds",), init=False)

    def folds_of(self, label: str) -> list[int]:
        """Fold units of a regime: one per fold when it trains on invariance examples."""
        uses_inv = regime_for(label, BUDGETS[self.budget])[0].uses_inv
        return list(range(self.inv_folds)) if uses_inv else [NO_FOLD]

    @property
    def units(self) -> list[Unit]:
        return [
            (label, seed, fold)
            for seed in range(self.seeds)
            for label in self.regimes
            for fold in self.folds_of(label)
        ]

    def record(self) -> dict:
        return {
            "budget": self.budget,
            "eps": self.eps,
            "regimes": ",".join(self.regimes),
            "seeds": self.seeds,
            "inv_folds": self.inv_folds,
            "inv_sets": ",".join(self.inv_sets),
            "fold_seed": self.fold_seed,
            "allow_small_folds": self.allow_small_folds,
            "fold_digest": self.fold_digest,
            "test_indices_sha": self.test_indices_sha,
            "n_test": self.n_test,
            "heartbeat_interval": self.heartbeat.interval,
            "grace_period": self.heartbeat.grace_period,
            "max_retry": self.heartbeat.max_retry,
        }

    def study_attrs(self) -> dict:
        return {ATTR_PLAN: json.dumps(self.record())}

    def incompatibility(self, study: optuna.Study) -> str | None:
        if not study.user_attrs or set(study.user_attrs) <= {ATTR_KIND, ATTR_LEADER}:
            return None  # being set up right now by an identical command: it will lead
        if study.user_attrs.get(ATTR_KIND) != KIND:
            return (
                f"study {self.study_name!r} exists and is not an experiment study; choose another"
            )
        if ATTR_PLAN not in study.user_attrs:
            return None
        old = json.loads(study.user_attrs[ATTR_PLAN])
        mine = self.record()
        keys = ("budget", "eps", "regimes", "seeds", "inv_folds", "fold_digest", "test_indices_sha")
        changed = [k for k in keys if old.get(k) != mine[k]]
        if changed:
            was = ", ".join(f"{k}={old.get(k)}" for k in changed)
            return (
                f"experiment study {self.study_name!r} exists with {was}; resume it with the "
                "same values or choose another --study-name"
            )
        return None

    @classmethod
    def from_study(cls, study: optuna.Study, data_dir: str | None) -> ExperimentPlan:
        attrs = study.user_attrs
        if attrs.get(ATTR_KIND) != KIND or ATTR_PLAN not in attrs:
            hint = (
                " (a tune study: join it with robustlab tune-worker)"
                if ATTR_PARENT in attrs
                else ""
            )
            raise ConfigError(
                f"study {study.study_name!r} is not a robustlab experiment study{hint}"
            )
        p = json.loads(attrs[ATTR_PLAN])
        ids = parent_ids(study)
        if ids is None:
            raise ConfigError(
                f"study {study.study_name!r} has no parent run yet; start it with robustlab "
                "experiment"
            )
        return cls(
            budget=p["budget"],
            eps=float(p["eps"]),
            regimes=tuple(p["regimes"].split(",")),
            seeds=int(p["seeds"]),
            inv_folds=int(p["inv_folds"]),
            inv_sets=tuple(p["inv_sets"].split(",")),
            fold_seed=int(p["fold_seed"]),
            allow_small_folds=bool(p["allow_small_folds"]),
            fold_digest=p["fold_digest"],
            test_indices_sha=p["test_indices_sha"],
            n_test=int(p["n_test"]),
            heartbeat=Heartbeat.from_record(p),
            study_name=study.study_name,
            data_dir=data_dir,
            parent_run_id=ids[0],
            experiment_id=ids[1],
        )

    # ---- the leader side ----------------------------------------------------------------

    def enqueue_missing(self, study: optuna.Study) -> None:
        """One WAITING trial per unit that has no COMPLETE, WAITING or RUNNING trial yet."""
        live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        present = {unit_of(t) for t in study.get_trials(deepcopy=False, states=live)}
        for label, seed, fold in self.units:
            if (label, seed, fold) not in present:
                study.enqueue_trial(
                    {"regime": label, "seed": seed, "fold": fold},
                    user_attrs={REGIME_ATTR: label, SEED_ATTR: seed, FOLD_ATTR: fold},
                )

    def pending(self, study: optuna.Study) -> list[Unit]:
        """Units without a COMPLETE trial."""
        complete = {
            unit_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        }
        return [u for u in self.units if u not in complete]

    def done(self, study: optuna.Study) -> bool:
        return not self.pending(study)

    def tally(self, study: optuna.Study) -> tuple[int, int]:
        return len(self.units) - len(self.pending(study)), len(self.units)

    def demand(self, study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    # ---- the worker side ----------------------------------------------------------------

    def worker_setup(self) -> dict:
        return {}

    def after_trial(self) -> None:
        release()

    def next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        return optuna_compat.pop_waiting_trial(study)  # never a new (sampled) trial

    def run_trial(self, trial: optuna.Trial, retry: Retry | None) -> float | None:
        """Train the unit of `trial`; None (ended FAIL) when it is not one of the units."""
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        unit = unit_of(frozen)
        if unit is None:
            print(f"trial {trial.number}: not an enqueued unit, ended FAIL", file=sys.stderr)
            return None
        for name, dist in unit_distributions(self.regimes, self.seeds, self.inv_folds).items():
            optuna_compat.record_enqueued_param(trial, name, dist)
        t0 = time.perf_counter()
        run_id = self.train_unit(*unit, trial, retry)
        seconds = time.perf_counter() - t0
        trial.set_user_attr(RUN_ATTR, run_id)
        label, seed, fold = unit
        print(
            f"trial {trial.number}: {label} seed {seed} fold {fold} -> run {run_id} "
            f"({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return seconds

    def first_phase_run(self, study: optuna.Study, label: str, seed: int) -> str | None:
        """The run whose model `label`'s fold models start from (`FIRST_PHASE_FROM`): the same
        seed's unit of the base regime, waited for while a worker trains it; None when the plan
        has no such regime or nobody is training it (the unit then trains every phase itself)."""
        base = FIRST_PHASE_FROM.get(label)
        b = BUDGETS[self.budget]
        if base is None or base not in self.regimes:
            return None
        first, whole = regime_for(label, b)[0].phases[0], regime_for(base, b)[0].phases
        if len(whole) != 1 or (first.mix, first.epochs) != (whole[0].mix, whole[0].epochs):
            return None  # not the same training: train the phase here
        announced = False
        while True:
            trials = [
                t for t in study.get_trials(deepcopy=False) if unit_of(t) == (base, seed, NO_FOLD)
            ]
            done = [
                t for t in trials if t.state == TrialState.COMPLETE and RUN_ATTR in t.user_attrs
            ]
            if done:
                return done[0].user_attrs[RUN_ATTR]
            if not any(t.state == TrialState.RUNNING for t in trials):
                return None  # nobody trains it now (failed, or waits behind us): train it here
            if not announced:
                print(
                    f"{label} seed {seed}: waiting for {base} seed {seed} (its first phase)",
                    file=sys.stderr,
                    flush=True,
                )
                announced = True
            time.sleep(15)

    def cv(self) -> tuple[HumanPool, FoldAssignment]:
        return _checked_cv(
            self.data_dir,
            self.inv_sets,
            self.inv_folds,
            self.fold_seed,
            self.allow_small_folds,
            self.fold_digest,
        )

    def train_unit(
        self, label: str, seed: int, fold: int, trial: optuna.Trial, retry: Retry | None
    ) -> str:
        """Train and evaluate one unit as a child of the experiment's parent run."""
        import psutil

        from robustlab.train.runner import Extras, InvData, Judging, Placement, Watch, run_training

        b = BUDGETS[self.budget]
        regime, label_source = regime_for(label, b)
        test_indices = _checked_test_indices(b.eval_size, self.data_dir, self.test_indices_sha)
        pool, folds = self.cv()
        if fold == NO_FOLD:  # trains on no invariance example: predicts every one
            pools, predict = None, tuple(pool.sets.values())
        else:
            pools, predict = fold_pools(
                pool, folds, fold, label_source, train_sets=train_sets_for(label)
            )
        cfg, ev = pair_configs(b, seed, self.data_dir, self.eps)
        if fold not in (NO_FOLD, 0):  # the strong attack on one model per regime and seed
            ev = replace(ev, autoattack_size=0)
        base = self.first_phase_run(trial.study, label, seed)
        if base is not None:  # start from that run's model; train the remaining phases
            regime = replace(regime, phases=regime.phases[1:])
        cfg = replace(
            cfg,
            train=replace(
                cfg.train,
                epochs=regime.phases[0].epochs,
                resume_run_id=retry.resume_run_id if retry else None,
                init_model=f"runs:/{base}/model" if base else None,
            ),
        )
        tags = {
            "robustlab.experiment_regime": label,
            "robustlab.seed": str(seed),
            "robustlab.fold": str(fold),
            "robustlab.study": self.study_name,
            "robustlab.trial": str(trial.number),
        }
        if base is not None:
            tags["robustlab.first_phase_from"] = base
        tags |= retry_tags(retry, KIND)
        started = time.time() - psutil.Process().create_time()  # imports, data, test set
        print(
            f"== experiment: {label} seed {seed} fold {fold} ({started:.1f} s since the worker "
            "started) ==",
            file=sys.stderr,
            flush=True,
        )
        return run_training(
            regime,
            cfg,
            ev,
            Extras(
                inv=InvData(label_source=label_source, pools=pools, predict_sets=predict),
                run=Placement(
                    run_name=f"{label}-seed{seed}" + ("" if fold == NO_FOLD else f"-fold{fold}"),
                    parent_run_id=self.parent_run_id,
                    experiment_id=self.experiment_id,
                    tags=tags,
                ),
                watch=Watch(
                    all_curves=True, inv_curve=pools is not None, on_epoch=RunOnTrial(trial)
                ),
                judge=Judging(test_indices=test_indices),
            ),
        )


def release() -> None:
    """Drop what one unit left behind: Keras' graph state, cached attack graphs, garbage."""
    import keras

    from robustlab.attacks.tf_attacks import clear_attack_cache

    clear_attack_cache()
    keras.backend.clear_session()
    gc.collect()
