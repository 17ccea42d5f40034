"""The tune plan: one trial trains the joint regime through `run_training` and is scored on
validation data only (`robustlab.evaluation.selection`).

`pareto` returns (sel/clean_acc, sel/pgd_acc, sel/inv_bal_acc); `scalar` returns the selection
rule's score (`sel/score`, the same rule `register` chooses by). Both set the constraint
`clean_floor - sel/clean_acc <= 0`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from functools import cached_property

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.config import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    MixConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
    pgd_step_size,
)
from robustlab.errors import ConfigError
from robustlab.evaluation.selection import SCORE_METRIC, SelectionData, selection_score
from robustlab.evaluation.validation import selection_validation
from robustlab.launch.launcher import RUN_ATTR, Retry, RunOnTrial, parent_ids, retry_tags
from robustlab.launch.storage import Heartbeat, redact_url
from robustlab.regimes import make_regime
from robustlab.tune.budgets import BUDGETS, suggest, suggest_beta

PARETO_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc")
CONSTRAINT = "clean_floor"
PRUNED_TAG = "robustlab.pruned"
ATTR_CONFIG = "robustlab_config"
DIRECTIONS = {"pareto": ["maximize"] * 3, "scalar": ["maximize"]}
METRIC_NAMES = {"pareto": list(PARETO_METRICS), "scalar": [SCORE_METRIC]}
# a resumed study must keep these (its trials must stay comparable)
FIXED_KEYS = (
    "objective",
    "budget",
    "clean_floor",
    "eps",
    "seed",
    "tune_lr",
    "tune_warmup",
    "method",
    "tune_beta",
)


def stored_config(cfg: TuneConfig) -> dict:
    """The configuration as the study stores it: the storage URL redacted (never a password)."""
    out = asdict(cfg)
    out["storage"] = redact_url(cfg.storage) if cfg.storage else None
    return out


@dataclass
class TunePlan:
    """The tune study as a launcher plan; `parent_run_id`/`experiment_id` come from the study;
    `worker` seeds a worker's sampler."""

    cfg: TuneConfig
    parent_run_id: str = ""
    experiment_id: str = ""
    worker: int = 0
    kind: str = field(default="tune", init=False)

    @property
    def study_name(self) -> str:
        return self.cfg.name

    @property
    def directions(self) -> list[str]:
        return DIRECTIONS[self.cfg.objective]

    @property
    def metric_names(self) -> list[str]:
        return METRIC_NAMES[self.cfg.objective]

    @property
    def heartbeat(self) -> Heartbeat:
        return self.cfg.heartbeat

    def study_attrs(self) -> dict:
        return {
            "objective": self.cfg.objective,
            "clean_floor": self.cfg.clean_floor,
            ATTR_CONFIG: json.dumps(stored_config(self.cfg)),
        }

    def incompatibility(self, study: optuna.Study) -> str | None:
        wanted = [optuna.study.StudyDirection.MAXIMIZE] * len(self.directions)
        if list(study.directions) != wanted:
            return (
                f"study {self.study_name!r} exists with {len(study.directions)} objective(s), "
                f"not objective={self.cfg.objective} ({len(wanted)}); choose another study_name"
            )
        old = json.loads(study.user_attrs.get(ATTR_CONFIG, "{}"))
        mine = asdict(self.cfg)
        changed = [k for k in FIXED_KEYS if k in old and old[k] != mine[k]]
        if changed:
            was = ", ".join(f"{k}={old[k]}" for k in changed)
            return (
                f"study {self.study_name!r} exists with {was}; resume it with the same values "
                "or choose another study_name"
            )
        return None

    @classmethod
    def from_study(cls, study: optuna.Study, storage_url: str, worker: int = 0) -> TunePlan:
        """A worker's plan, read from the study's attributes (ConfigError when they are not a
        tune study's or do not match its directions)."""
        ids = parent_ids(study)
        if ids is None or ATTR_CONFIG not in study.user_attrs:
            raise ConfigError(f"study {study.study_name!r} was not created by robustlab tune")
        stored = json.loads(study.user_attrs[ATTR_CONFIG])
        fields = {f.name for f in dataclasses.fields(TuneConfig)}
        known = {k: v for k, v in stored.items() if k in fields}
        known["heartbeat"] = Heartbeat.from_record(stored)
        cfg = TuneConfig(**{**known, "storage": storage_url})
        plan = cls(cfg, *ids, worker=worker)
        wanted = [optuna.study.StudyDirection.MAXIMIZE] * len(plan.directions)
        if list(study.directions) != wanted:
            raise ConfigError(
                f"study {study.study_name!r} has {len(study.directions)} objective direction(s) "
                f"{[d.name.lower() for d in study.directions]}, but its configuration asks for "
                f"objective={cfg.objective} ({len(wanted)} x maximize); it was not made by this "
                "robustlab version: start a new study with robustlab tune"
            )
        return plan

    # ---- the worker side ---------------------------------------------------------------

    def worker_setup(self) -> dict:
        from robustlab.tune.samplers import make_pruner, make_sampler

        if self.cfg.threads:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(self.cfg.threads)
            tf.config.threading.set_inter_op_parallelism_threads(self.cfg.threads)
        return {"sampler": make_sampler(self.cfg, self.worker), "pruner": make_pruner(self.cfg)}

    def after_trial(self) -> None:
        pass

    def next_trial(self, study: optuna.Study) -> optuna.Trial:
        return study.ask()  # a retried (WAITING) trial first, else the sampler's next point

    def done(self, study: optuna.Study) -> bool:
        return self.tally(study)[0] >= self.cfg.n_trials

    def tally(self, study: optuna.Study) -> tuple[int, int]:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min(len(complete), self.cfg.n_trials), self.cfg.n_trials

    def demand(self, study: optuna.Study) -> int:
        """Trials still to start (for the number of local workers to keep)."""
        trials = study.get_trials(deepcopy=False)
        started = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in trials)
        return self.cfg.n_trials - started

    @cached_property
    def budget(self):
        return BUDGETS[self.cfg.budget]

    @cached_property
    def selection(self) -> SelectionData:
        """Validation data, loaded once per worker process."""
        return SelectionData(
            self.cfg.data_dir,
            self.cfg.eps,
            val_attack_size=self.budget.val_attack_size,
            train_size=self.budget.train_size,  # the runner's cached MNIST: one copy in memory
        )

    def run_config(
        self, lr: float, warmup: float, mix: MixConfig, resume: str | None, beta: float = 6.0
    ) -> RunConfig:
        cfg, b = self.cfg, self.budget
        attack = AttackConfig(
            eps=cfg.eps,
            steps=b.attack_steps,
            step_size=pgd_step_size(cfg.eps, b.attack_steps),
            eps_warmup=warmup,
            method=cfg.method,
            trades_beta=beta,
        )
        train = TrainConfig(
            epochs=b.epochs,
            batch_size=b.batch_size,
            learning_rate=lr,
            seed=cfg.seed,
            patience=0,
            resume_run_id=resume,
            precision=cfg.precision,
        )
        return RunConfig(DataConfig(cfg.data_dir, b.train_size, b.eval_size), train, mix, attack)

    def run_trial(self, trial: optuna.Trial, retry: Retry | None) -> float | tuple[float, ...]:
        """Train the joint regime on the trial's mixture as a child run; its objective value(s)."""
        import keras

        from robustlab.train.runner import Extras, Judging, Placement, Watch, run_training

        cfg, b = self.cfg, self.budget
        keras.backend.clear_session()
        mix, lr, warmup = suggest(trial, cfg)
        beta = suggest_beta(trial, cfg)
        run_cfg = self.run_config(lr, warmup, mix, retry.resume_run_id if retry else None, beta)
        ev = EvalConfig(
            eps=cfg.eps, eval_size=b.eval_size, autoattack_size=0, pgd_restarts=0, seed=cfg.seed
        )
        regime = make_regime("joint", epochs=b.epochs, mix=mix)
        final: dict[str, float] = {}
        hooks = _TrialHooks(self, trial, final)
        tags = {
            "robustlab.kind": "tune-trial",
            "robustlab.study": self.study_name,
            "robustlab.trial": str(trial.number),
        }
        tags |= retry_tags(retry, "tune")
        extras = Extras(
            run=Placement(
                run_name=f"{self.study_name}-trial{trial.number}",
                parent_run_id=self.parent_run_id,
                experiment_id=self.experiment_id,
                tags=tags,
            ),
            watch=Watch(
                all_curves=True,
                validators=(selection_validation(list(self.selection.sets.values())),),
                on_epoch=hooks.on_epoch,
                val_attack_size=b.val_attack_size,
            ),
            judge=Judging(
                robust_eval=False, excluded=self.selection.sources, on_trained=hooks.on_trained
            ),
        )
        try:
            run_id = run_training(regime, run_cfg, ev, extras)
        except optuna.TrialPruned:
            if hooks.run_id:  # the runner ended it FAILED; a pruned run is KILLED, tagged pruned
                MlflowClient().set_terminated(hooks.run_id, "KILLED")
            raise
        trial.set_user_attr(RUN_ATTR, run_id)
        for key, value in final.items():
            if math.isfinite(value):
                trial.set_user_attr(key, value)
        trial.set_constraint(CONSTRAINT, cfg.clean_floor - final["sel/clean_acc"])
        print(
            f"trial {trial.number}: "
            + ", ".join(f"{k}={final[k]:.4f}" for k in (*PARETO_METRICS, SCORE_METRIC)),
            file=sys.stderr,
            flush=True,
        )
        if cfg.objective == "scalar":
            return final[SCORE_METRIC]
        return tuple(final[k] for k in PARETO_METRICS)


@dataclass
class _TrialHooks:
    """The runner's per-epoch and end-of-training hooks for one trial."""

    plan: TunePlan
    trial: optuna.Trial
    final: dict[str, float]

    def __post_init__(self) -> None:
        self.on_run = RunOnTrial(self.trial)

    @property
    def run_id(self) -> str | None:
        return self.on_run.run_id

    def on_epoch(self, metrics: dict[str, float], step: int) -> None:
        self.on_run(metrics, step)
        cfg = self.plan.cfg
        if cfg.objective != "scalar":
            return
        value = selection_score(
            metrics["val/clean_acc"],
            metrics["val/pgd_acc"],
            metrics["val/sel_inv_bal_acc"],
            cfg.clean_floor,
        )
        mlflow.log_metric("val/score", value, step=step)
        self.trial.report(value, step)
        if self.trial.should_prune():
            mlflow.set_tag(PRUNED_TAG, "true")
            raise optuna.TrialPruned(f"trial {self.trial.number} pruned at epoch {step + 1}")

    def on_trained(self, model) -> dict[str, float]:
        m = self.plan.selection.metrics(model, self.plan.cfg.clean_floor)
        self.final.update(m)
        return m
