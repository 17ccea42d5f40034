"""One trial: train the joint regime through `run_training` and score it on validation data only.

Objectives (all on validation data; the MNIST test set is never used for selection):
- `sel/clean_acc`: clean accuracy on the 5,000-image validation split;
- `sel/pgd_acc`: PGD-10 accuracy (training eps) on a fixed, seeded validation subset;
- `sel/inv_bal_acc`: balanced invariance accuracy on the selection set
  (robustlab.invariance.selection), beside the plain `sel/inv_acc`.
`pareto` returns the three; `scalar` returns `score` below. Both set the constraint
`clean_floor - sel/clean_acc <= 0`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

from robustlab.config import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
)
from robustlab.data.mnist import load_mnist, subsample
from robustlab.invariance.selection import (
    balanced_inv_accuracy,
    selection_sets,
    selection_sources,
)
from robustlab.regimes import make_regime
from robustlab.train.inv_pool import load_inv_pools, selection_validation
from robustlab.train.loop import clean_validation
from robustlab.train.runner import Extras, _pgd_validation, run_training
from robustlab.tune.space import BUDGETS, suggest

PARETO_METRICS = ("sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc")
SCORE_METRIC = "sel/score"
CONSTRAINT = "clean_floor"
PRUNED_TAG = "robustlab.pruned"


def score(clean: float, pgd: float, inv_bal: float, clean_floor: float) -> float:
    """The scalar objective: mean of PGD and balanced invariance accuracy, minus the clean
    accuracy's shortfall below the floor (each point below it costs one point)."""
    return (pgd + inv_bal) / 2 - max(0.0, clean_floor - clean)


def _checkpointed_run(run_id: str | None) -> str | None:
    """`run_id` when that (lost) trial run left an intact checkpoint to continue from (a worker
    killed while uploading leaves a partial one: start afresh then), else None."""
    import tempfile

    from robustlab.train.checkpoint import CHECKPOINT_ARTIFACT, newest_intact

    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp
            )
            newest_intact(Path(folder))
        except Exception:  # noqa: BLE001 - no run, no checkpoint or a partial one: start afresh
            return None
    return run_id


@dataclass(frozen=True)
class StudyContext:
    """What every worker reads from the study's user attributes."""

    cfg: TuneConfig
    study_name: str
    parent_run_id: str
    experiment_id: str


class Objective:
    """Callable for `study.optimize`; loads the data once per worker process."""

    def __init__(self, ctx: StudyContext):
        self.ctx = ctx
        cfg = ctx.cfg
        self.budget = BUDGETS[cfg.budget]
        mnist = load_mnist(cfg.data_dir, train_size=self.budget.train_size)
        pools = load_inv_pools(cfg.data_dir)
        self.sel_sets = selection_sets(cfg.data_dir, pools)
        self.sel_sources = tuple(int(i) for i in selection_sources(cfg.data_dir, pools))
        self.clean_val = clean_validation(mnist.val)
        val_small = subsample(mnist.val, self.budget.val_attack_size, seed=0)
        self.pgd_val = _pgd_validation(val_small.x, val_small.y, self._run_config(1e-3, 1.0, None))

    def _run_config(self, lr: float, warmup: float, mix, resume: str | None = None) -> RunConfig:
        cfg, b = self.ctx.cfg, self.budget
        attack = AttackConfig(
            eps=cfg.eps,
            steps=b.attack_steps,
            step_size=2.5 * cfg.eps / b.attack_steps,
            eps_warmup=warmup,
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
        data = DataConfig(cfg.data_dir, b.train_size, b.eval_size)
        return RunConfig(data, train, mix, attack) if mix else RunConfig(data, train, attack=attack)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float, float]:
        cfg, b = self.ctx.cfg, self.budget
        keras.backend.clear_session()
        mix, lr, warmup = suggest(trial, cfg)
        # Optuna 5 has no Trial.system_attrs: ask about the stored (frozen) trial
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(
            trial.study.get_trials(deepcopy=False)[trial.number]
        )
        # a retried trial inherits the lost trial's user attributes, its run id included
        resume = (
            _checkpointed_run(trial.user_attrs.get("mlflow_run_id"))
            if retry_of is not None
            else None
        )
        run_cfg = self._run_config(lr, warmup, mix, resume)
        ev = EvalConfig(
            eps=cfg.eps, eval_size=b.eval_size, autoattack_size=0, pgd_restarts=0, seed=cfg.seed
        )
        regime = make_regime("joint", epochs=b.epochs, mix=mix)
        run_ids: list[str] = []
        final: dict[str, float] = {}
        scalar = cfg.objective == "scalar"

        def on_epoch(metrics: dict[str, float], step: int) -> None:
            if not run_ids:
                run_ids.append(mlflow.active_run().info.run_id)
                trial.set_user_attr("mlflow_run_id", run_ids[0])
            if not scalar:
                return
            value = score(
                metrics["val/clean_acc"],
                metrics["val/pgd_acc"],
                metrics["val/sel_inv_bal_acc"],
                cfg.clean_floor,
            )
            mlflow.log_metric("val/score", value, step=step)
            trial.report(value, step)
            if trial.should_prune():
                mlflow.set_tag(PRUNED_TAG, "true")
                raise optuna.TrialPruned(f"trial {trial.number} pruned at epoch {step + 1}")

        def on_trained(model: keras.Model) -> dict[str, float]:
            m = {
                "sel/clean_acc": self.clean_val(model)["val/clean_acc"],
                "sel/pgd_acc": self.pgd_val(model)["val/pgd_acc"],
                **balanced_inv_accuracy(model, self.sel_sets, "sel"),
            }
            m[SCORE_METRIC] = score(
                m["sel/clean_acc"], m["sel/pgd_acc"], m["sel/inv_bal_acc"], cfg.clean_floor
            )
            final.update(m)
            return m

        tags = {
            "robustlab.kind": "tune-trial",
            "robustlab.study": self.ctx.study_name,
            "robustlab.trial": str(trial.number),
        }
        if retry_of is not None:
            tags["robustlab.tune.retry_of"] = str(retry_of)
        extras = Extras(
            all_curves=True,
            robust_eval=False,
            run_name=f"{self.ctx.study_name}-trial{trial.number}",
            parent_run_id=self.ctx.parent_run_id,
            experiment_id=self.ctx.experiment_id,
            tags=tags,
            validators=(selection_validation(list(self.sel_sets.values())),),
            on_epoch=on_epoch,
            excluded=self.sel_sources,
            on_trained=on_trained,
            val_attack_size=b.val_attack_size,
        )
        try:
            run_id = run_training(regime, run_cfg, ev, extras)
        except optuna.TrialPruned:
            if run_ids:  # the runner ended it FAILED; a pruned run is KILLED, tagged pruned
                MlflowClient().set_terminated(run_ids[0], "KILLED")
            raise
        trial.set_user_attr("mlflow_run_id", run_id)
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
        if scalar:
            return final[SCORE_METRIC]
        return tuple(final[k] for k in PARETO_METRICS)
