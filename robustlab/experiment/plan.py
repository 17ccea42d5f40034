"""The experiment plan: which regimes, budgets and pairs an experiment trains, as a launcher plan.

An experiment's study holds one enqueued (WAITING) trial per regime × seed. A worker pops
WAITING trials only (never asks the sampler for a new point), trains the pair through
`run_training` as a child run of the experiment's parent run, records the run id on the trial and
tells it COMPLETE. Heartbeats get the pair of a worker that died retried with the same parameters.
"""

from __future__ import annotations

import gc
import hashlib
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
from robustlab.errors import ConfigError, DataError
from robustlab.experiment.budgets import BUDGETS, Budget, regime_for
from robustlab.launch import optuna_compat
from robustlab.launch.launcher import ATTR_EXPERIMENT, ATTR_KIND, ATTR_PARENT, RUN_ATTR, Retry
from robustlab.launch.storage import Heartbeat

KIND = "experiment"
ATTR_PLAN = "robustlab_experiment"  # JSON: budget, eps, regimes, seeds, test set, heartbeats
REGIME_ATTR = "experiment_regime"
SEED_ATTR = "experiment_seed"
TEST_SUBSET_SEED = 0  # the experiment's test subset is fixed per experiment, not per training seed


def pair_configs(
    b: Budget, seed: int, data_dir: str | None, eps: float, check_model: bool = True
) -> tuple[RunConfig, EvalConfig]:
    """One pair's configuration (`check_model=False`: no Keras import, for the parent)."""
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
        autoattack_size=b.autoattack_size,
        pgd_restarts=b.pgd_restarts,
        seed=seed,
        curve_size=b.curve_size,
        curve_points=b.curve_points,
        square_queries=b.square_queries,
        square_alone=b.square_alone,
        pgd_engine=b.pgd_engine,
    )
    return cfg.validate(check_model), ev.validate()


def shared_test_indices(
    label_sources: set[str], eval_size: int, data_dir: str | None
) -> tuple[int, ...]:
    """The MNIST test images every regime × seed of one experiment is evaluated on.

    The test set minus the union of the sources every run excludes (the invariance pools of
    every label source the experiment trains with, training and validation), then a subset of
    `eval_size` (0 = all) seeded by TEST_SUBSET_SEED: one set, whatever the regime and seed.
    """
    from robustlab.data.leakage import excluded_test_indices
    from robustlab.data.mnist import Split, load_raw_mnist, subsample
    from robustlab.data.pools import load_inv_pools

    raw = load_raw_mnist(data_dir)  # the indices need no pixels: skip the float32 copy
    n_test = raw.y_test.shape[0]
    test = Split(np.empty((n_test, 0), np.uint8), raw.y_test, "test", np.arange(n_test))
    del raw
    excluded = np.unique(
        np.concatenate(
            [
                excluded_test_indices(load_inv_pools(data_dir, source).used_sets)
                for source in sorted(label_sources)
            ]
            or [np.empty(0, np.int64)]
        )
    )
    test = subsample(test.without_sources(excluded), eval_size, seed=TEST_SUBSET_SEED)
    return tuple(int(i) for i in test.source_index)


def indices_digest(indices: tuple[int, ...]) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def pair_distributions(regimes: tuple[str, ...], seeds: int) -> dict:
    """The trials' two params (one distribution each per study: Optuna refuses categorical
    choices that differ between trials)."""
    return {"regime": CategoricalDistribution(regimes), "seed": IntDistribution(0, seeds - 1)}


def pair_of(trial: optuna.trial.FrozenTrial) -> tuple[str, int] | None:
    label, seed = trial.user_attrs.get(REGIME_ATTR), trial.user_attrs.get(SEED_ATTR)
    return None if label is None or seed is None else (label, int(seed))


@cache
def _checked_test_indices(
    label_sources: tuple[str, ...], eval_size: int, data_dir: str | None, sha: str
) -> tuple[int, ...]:
    """The experiment's shared test images, recomputed from this machine's data and checked
    against the digest the experiment recorded (other data would compare other images)."""
    indices = shared_test_indices(set(label_sources), eval_size, data_dir)
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
    label_sources: tuple[str, ...]
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

    @property
    def pairs(self) -> list[tuple[str, int]]:
        return [(label, seed) for seed in range(self.seeds) for label in self.regimes]

    def record(self) -> dict:
        return {
            "budget": self.budget,
            "eps": self.eps,
            "regimes": ",".join(self.regimes),
            "seeds": self.seeds,
            "label_sources": list(self.label_sources),
            "test_indices_sha": self.test_indices_sha,
            "n_test": self.n_test,
            "heartbeat_interval": self.heartbeat.interval,
            "grace_period": self.heartbeat.grace_period,
            "max_retry": self.heartbeat.max_retry,
        }

    def study_attrs(self) -> dict:
        return {ATTR_PLAN: json.dumps(self.record())}

    def incompatibility(self, study: optuna.Study) -> str | None:
        if study.user_attrs.get(ATTR_KIND) != KIND:
            return (
                f"study {self.study_name!r} exists and is not an experiment study; choose another"
            )
        old = json.loads(study.user_attrs.get(ATTR_PLAN, "{}"))
        mine = self.record()
        keys = ("budget", "eps", "regimes", "seeds", "test_indices_sha")
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
        return cls(
            budget=p["budget"],
            eps=float(p["eps"]),
            regimes=tuple(p["regimes"].split(",")),
            seeds=int(p["seeds"]),
            label_sources=tuple(p["label_sources"]),
            test_indices_sha=p["test_indices_sha"],
            n_test=int(p["n_test"]),
            heartbeat=Heartbeat(p["heartbeat_interval"], p["grace_period"], p["max_retry"]),
            study_name=study.study_name,
            data_dir=data_dir,
            parent_run_id=attrs[ATTR_PARENT],
            experiment_id=attrs[ATTR_EXPERIMENT],
        )

    # ---- the leader side ----------------------------------------------------------------

    def enqueue_missing(self, study: optuna.Study) -> None:
        """One WAITING trial per pair that has no COMPLETE, WAITING or RUNNING trial yet."""
        live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        present = {pair_of(t) for t in study.get_trials(deepcopy=False, states=live)}
        for label, seed in self.pairs:
            if (label, seed) not in present:
                study.enqueue_trial(
                    {"regime": label, "seed": seed},
                    user_attrs={REGIME_ATTR: label, SEED_ATTR: seed},
                )

    def pending(self, study: optuna.Study) -> list[tuple[str, int]]:
        """Pairs without a COMPLETE trial."""
        complete = {
            pair_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        }
        return [p for p in self.pairs if p not in complete]

    def done(self, study: optuna.Study) -> bool:
        return not self.pending(study)

    def demand(self, study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    # ---- the worker side ----------------------------------------------------------------

    def next_trial(self, study: optuna.Study) -> optuna.Trial | None:
        return optuna_compat.pop_waiting_trial(study)  # never a new (sampled) trial

    def run_trial(self, trial: optuna.Trial, retry: Retry | None) -> float | None:
        """Train the pair of `trial`; None (ended FAIL) when it is not one of the pairs."""
        frozen = trial.study.get_trials(deepcopy=False)[trial.number]
        label, seed = frozen.user_attrs.get(REGIME_ATTR), frozen.user_attrs.get(SEED_ATTR)
        if label is None or seed is None:
            print(f"trial {trial.number}: not an enqueued pair, ended FAIL", file=sys.stderr)
            return None
        for name, dist in pair_distributions(self.regimes, self.seeds).items():
            optuna_compat.record_enqueued_param(trial, name, dist)
        t0 = time.perf_counter()
        run_id = self.train_pair(label, int(seed), trial, retry)
        seconds = time.perf_counter() - t0
        trial.set_user_attr(RUN_ATTR, run_id)
        print(
            f"trial {trial.number}: {label} seed {seed} -> run {run_id} ({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return seconds

    def train_pair(self, label: str, seed: int, trial: optuna.Trial, retry: Retry | None) -> str:
        """Train and evaluate one regime × seed as a child of the experiment's parent run."""
        import mlflow
        import psutil

        from robustlab.train.runner import Extras, run_training

        b = BUDGETS[self.budget]
        regime, label_source = regime_for(label, b)
        test_indices = _checked_test_indices(
            self.label_sources, b.eval_size, self.data_dir, self.test_indices_sha
        )
        cfg, ev = pair_configs(b, seed, self.data_dir, self.eps)
        cfg = replace(
            cfg,
            train=replace(
                cfg.train,
                epochs=regime.phases[0].epochs,
                resume_run_id=retry.resume_run_id if retry else None,
            ),
        )
        tags = {
            "robustlab.experiment_regime": label,
            "robustlab.seed": str(seed),
            "robustlab.study": self.study_name,
            "robustlab.trial": str(trial.number),
        }
        if retry is not None:
            tags["robustlab.experiment.retry_of"] = str(retry.of)
            tags["robustlab.retry_note"] = retry.note
        seen: list[str] = []

        def on_epoch(metrics: dict[str, float], step: int) -> None:
            if not seen:  # the run id on the trial as soon as the run exists (a lost run is found)
                seen.append(mlflow.active_run().info.run_id)
                trial.set_user_attr(RUN_ATTR, seen[0])

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
                parent_run_id=self.parent_run_id,
                experiment_id=self.experiment_id,
                tags=tags,
                test_indices=test_indices,
                on_epoch=on_epoch,
            ),
        )


def release() -> None:
    """Drop what one pair left behind: Keras' graph state, cached attack graphs, garbage."""
    import keras

    from robustlab.attacks.tf_attacks import clear_attack_cache

    clear_attack_cache()
    keras.backend.clear_session()
    gc.collect()
