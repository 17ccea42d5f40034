"""The experiment on the launcher: (regime, seed, fold) units as child runs, summarized into a
report on the parent run.

The leading process validates, prints the folds, creates the parent run and an Optuna study with
one enqueued trial per unit, starts worker processes (`robustlab experiment-worker`) that train
the units, and summarizes; it never trains (nor imports TensorFlow). Another `robustlab
experiment` started on the same study while a leader is alive joins it as a worker.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.data.folds import (
    FoldAssignment,
    HumanPool,
    assign_folds,
    load_human_pool,
    set_mask,
)
from robustlab.errors import ConfigError
from robustlab.evaluation.indices import EVALUATED_ARTIFACT, indices_digest
from robustlab.experiment import design
from robustlab.experiment.budgets import (
    DEFAULT_REGIMES,
    check_budget,
    parse_regimes,
    train_sets_for,
)
from robustlab.experiment.plan import (
    FOLD_ATTR,
    REGIME_ATTR,
    SEED_ATTR,
    TEST_SUBSET_SEED,
    ExperimentPlan,
    Unit,
    pair_configs,
    shared_test_indices,
    unit_distributions,
    unit_of,
)
from robustlab.experiment.summary import summarize
from robustlab.experiment.tables import write_csv
from robustlab.launch.launcher import RUN_ATTR, complete_runs, end_lost_runs, finished_children
from robustlab.launch.leader import Workers, lead
from robustlab.launch.leader import run_worker as launch_worker
from robustlab.launch.storage import STORAGE_ENV, Heartbeat, storage_url
from robustlab.tracking import configure_tracking


@dataclass(frozen=True)
class Options:
    """`robustlab experiment`'s options beyond the plan: where, how many workers, resumption."""

    workers: int = 1
    pairs_per_worker: int = 0  # units per worker process (0: no limit)
    storage: str | None = None
    study_name: str | None = None
    create_only: bool = False
    resume_run_id: str | None = None


@dataclass(frozen=True)
class Setup:
    """What the leader computed before any run exists, logged on the parent run."""

    plan: ExperimentPlan
    pool: HumanPool
    folds: FoldAssignment
    test_indices: tuple[int, ...]


def build_plan(
    budget: str,
    seeds: int,
    regimes: str,
    data_dir: str | None,
    eps: float,
    *,
    heartbeat: Heartbeat,
    inv_folds: int,
    inv_sets: tuple[str, ...],
    fold_seed: int,
    allow_small_folds: bool,
    study_name: str | None,
) -> Setup:
    """Every check, the folds and the shared test images (nothing is printed: a bad option
    must end in one line)."""
    b = check_budget(budget)
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    labels = parse_regimes(regimes) if regimes else list(DEFAULT_REGIMES)
    pair_configs(b, 0, data_dir, eps, check_model=False)  # the parent never imports TensorFlow
    pool = load_human_pool(data_dir, inv_sets)
    folds = assign_folds(pool, inv_folds, fold_seed, allow_small_folds=allow_small_folds)
    test_indices = shared_test_indices(b.eval_size, data_dir)
    plan = LeadingPlan(
        budget,
        eps,
        tuple(labels),
        seeds,
        inv_folds,
        tuple(pool.sets),
        fold_seed,
        allow_small_folds,
        folds.digest,
        indices_digest(test_indices),
        len(test_indices),
        heartbeat,
        study_name=study_name or "",
        data_dir=data_dir,
    )
    plan.setup = Setup(plan, pool, folds, test_indices)
    return plan.setup


def run_experiment(
    budget: str = "default",
    seeds: int = 3,
    regimes: str = "",
    data_dir: str | None = None,
    eps: float = 0.3,
    options: Options = Options(),
    *,
    heartbeat: Heartbeat | None = None,
    inv_folds: int = 5,
    inv_sets: tuple[str, ...] = (),
    fold_seed: int = 0,
    allow_small_folds: bool = False,
) -> str:
    """Train every unit as a child run, then log the tables, report and plots on the parent.

    The units are the enqueued trials of an Optuna study on `options.storage` (the argument,
    else $ROBUSTLAB_OPTUNA_STORAGE, else tracking/optuna.db), named `options.study_name`
    (default `experiment-<parent run id>`); `options.workers` local `robustlab
    experiment-worker` processes (a fresh one per `pairs_per_worker` units: memory stays
    bounded) train them, and workers on other machines may join. `create_only`: create the
    parent run and the study, train nothing. An existing study (same plan) is resumed: a new
    parent adopts its COMPLETE units and the missing ones are trained. `resume_run_id`: an
    earlier experiment's parent run (same budget, eps and folds) whose FINISHED children are
    adopted instead of trained again. (Long: it reads top to bottom as the experiment's steps,
    each one call.)
    """
    o = options
    if o.workers < 1 or o.pairs_per_worker < 0:
        raise ConfigError(
            f"workers must be >= 1 and pairs_per_worker >= 0 (0: no limit), got {o.workers} and "
            f"{o.pairs_per_worker}"
        )
    from robustlab.data.folds import HUMAN_SETS

    setup = build_plan(
        budget,
        seeds,
        regimes,
        data_dir,
        eps,
        heartbeat=(heartbeat or Heartbeat()).validate(),
        inv_folds=inv_folds,
        inv_sets=tuple(inv_sets) or HUMAN_SETS,
        fold_seed=fold_seed,
        allow_small_folds=allow_small_folds,
        study_name=o.study_name,
    )
    plan = setup.plan
    plan.resume_run_id = o.resume_run_id
    url = storage_url(o.storage)
    args = ["--max-trials", str(o.pairs_per_worker)] + (
        ["--data-dir", data_dir] if data_dir else []
    )
    workers = Workers(
        count=o.workers,
        command="experiment-worker",
        args=lambda _i: args,
        join=lambda name: run_worker(name, url, data_dir),
        max_failures=2 * len(plan.units),
    )
    return lead(plan, url, workers, o.create_only)


@dataclass
class LeadingPlan(ExperimentPlan):
    """The experiment plan as its leader runs it: the set-up it computed and the earlier
    experiment it resumes."""

    setup: Setup | None = None
    resume_run_id: str | None = None
    adoptable: dict[Unit, Run] = field(default_factory=dict)

    def check(self, existing: optuna.Study | None) -> None:
        if self.resume_run_id:
            self.adoptable = adoptable_children(self.resume_run_id, self)
        configure_tracking()
        _print_folds(self.setup)  # every check passed: the folds, before anything trains

    def parent(self, resumed: bool) -> tuple[str, dict, dict[str, str]]:
        tags = {"robustlab.kind": "experiment"}
        tags |= {"robustlab.resumed_from": self.resume_run_id} if self.resume_run_id else {}
        tags |= {"robustlab.resumed_study": "true"} if resumed else {}
        return f"experiment-{self.budget}", _params(self.setup), tags

    def prepare(self, study: optuna.Study, parent: Run) -> None:
        _log_setup(self.setup)
        _adopt_resumed(study, self, self.adoptable, self.resume_run_id, parent.info.run_id)
        self.enqueue_missing(study)

    def created(self, parent_id: str) -> None:
        _print_created(self.study_name, parent_id)

    def summarize(self, study: optuna.Study, parent_id: str, wall: float) -> None:
        mlflow.log_metrics({"experiment/wall_seconds": wall, **_peak_rss_mb()})
        runs = complete_runs(study, unit_of)
        end_lost_runs(study, set(runs.values()), "robustlab.experiment.worker_lost")
        summarize(parent_id, self, runs, wall)


def fold_counts(setup: Setup) -> dict[str, list[dict[str, int]]]:
    """Per-fold counts for the regimes that train on the whole pool and, where the plan has
    them, for claim 1's matched regimes (one set only)."""
    out = {"pool": setup.folds.counts()}
    for sets in sorted({train_sets_for(r) for r in setup.plan.regimes} - {None}):
        out["+".join(sets)] = setup.folds.counts(set_mask(setup.pool, sets))
    return out


def _print_folds(setup: Setup) -> None:
    pool, folds = setup.pool, setup.folds
    lines = [
        f"experiment: {pool.n} human-labelled examples ({int(pool.changed.sum())} label-changed) "
        f"from {len(pool.sources)} MNIST sources in {folds.k} folds (seed {folds.seed}); "
        f"{folds.val_fraction:.0%} of each fold model's training sources validate:",
        folds.describe(),
    ]
    for sets in sorted({train_sets_for(r) for r in setup.plan.regimes} - {None}):
        users = [r for r in setup.plan.regimes if train_sets_for(r) == sets]
        lines += [
            f"{', '.join(users)} train on {'+'.join(sets)} only:",
            folds.describe(set_mask(pool, sets), f" [{'+'.join(sets)}]"),
        ]
    b = check_budget(setup.plan.budget)
    n_pgd = min(b.pgd_size or setup.plan.n_test, setup.plan.n_test)
    src = pool.source
    changed = design.Group("changed", int(pool.changed.sum()), len(np.unique(src[pool.changed])))
    kept = design.Group("kept", int((~pool.changed).sum()), len(np.unique(src[~pool.changed])))
    lines.append(design.describe(changed, kept, n_pgd, setup.plan.seeds))
    if setup.plan.seeds < design.MIN_SEEDS:
        lines.append(
            f"note: {setup.plan.seeds} seed(s): the report will give effects but no verdict (a "
            f"verdict needs {design.MIN_SEEDS} training runs per regime)"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


def _print_created(study_name: str, parent_id: str) -> None:
    print(
        f"experiment study {study_name} created (parent run {parent_id}); train its units from "
        f"any machine with: robustlab experiment-worker --study-name {study_name} (the storage "
        f"URL in ${STORAGE_ENV}), then summarize with the same robustlab experiment command "
        f"plus --study-name {study_name}",
        file=sys.stderr,
    )


def _params(setup: Setup) -> dict:
    plan = setup.plan
    b = check_budget(plan.budget)
    return {
        "budget": plan.budget,
        "seeds": plan.seeds,
        "regimes": ",".join(plan.regimes),
        "eps": plan.eps,
        **vars(b),
        "inv_folds": plan.inv_folds,
        "inv_sets": ",".join(plan.inv_sets),
        "fold_seed": plan.fold_seed,
        "allow_small_folds": plan.allow_small_folds,
        "fold_digest": plan.fold_digest,
        "n_inv_examples": setup.pool.n,
        "n_inv_changed": int(setup.pool.changed.sum()),
        "test_subset_seed": TEST_SUBSET_SEED,
        "n_test": plan.n_test,
        "test_indices_sha": plan.test_indices_sha,
    }


def _log_setup(setup: Setup) -> None:
    """The shared test images, the pool with each example's fold, and the per-fold counts."""
    mlflow.log_dict(
        {"mnist_split": "test", "indices": list(setup.test_indices)}, EVALUATED_ARTIFACT
    )
    folds = setup.folds
    rows = [
        {**row, "fold": int(f)}
        for row, f in zip(setup.pool.rows(), folds.fold_of_example, strict=True)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(write_csv(rows, Path(tmp) / "folds.csv")))
    mlflow.log_dict(
        {
            "k": folds.k,
            "seed": folds.seed,
            "digest": folds.digest,
            "val_fraction": folds.val_fraction,
            "folds": fold_counts(setup),
        },
        "folds.json",
    )


def _adopt_resumed(
    study: optuna.Study,
    plan: ExperimentPlan,
    done: dict[Unit, Run],
    old_parent: str | None,
    parent_id: str,
) -> None:
    """The FINISHED children of a resumed experiment become COMPLETE trials of this study."""
    client = MlflowClient()
    complete = complete_runs(study, unit_of)
    units = set(plan.units)
    for unit, old in done.items():
        if unit not in units:
            continue
        label, seed, fold = unit
        print(
            f"== experiment: {label} seed {seed} fold {fold}: reusing run {old.info.run_id} ==",
            file=sys.stderr,
            flush=True,
        )
        client.set_tag(old.info.run_id, "robustlab.moved_from_parent", old_parent or "")
        client.set_tag(old.info.run_id, "mlflow.parentRunId", parent_id)
        if unit in complete:
            continue
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[((old.info.end_time or old.info.start_time) - old.info.start_time) / 1000],
                params={"regime": label, "seed": seed, "fold": fold},
                distributions=unit_distributions(plan.regimes, plan.seeds, plan.inv_folds),
                user_attrs={
                    REGIME_ATTR: label,
                    SEED_ATTR: seed,
                    FOLD_ATTR: fold,
                    RUN_ATTR: old.info.run_id,
                    "adopted_from": old.data.tags.get("mlflow.parentRunId", ""),
                },
            )
        )


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest worker it started (Linux: KiB)."""
    import resource

    return {
        "experiment/parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "experiment/worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        / 1024,
    }


def adoptable_children(parent_id: str, plan: ExperimentPlan) -> dict[Unit, Run]:
    """The FINISHED units of experiment `parent_id`, checked to be comparable: the same budget,
    eps, folds and test images."""
    configure_tracking()  # before the parent run exists: look in the same store it will use
    parent, children = finished_children(parent_id, "resume_run_id")
    p = parent.data.params
    if parent.data.tags.get("robustlab.kind") != "experiment":
        raise ConfigError(f"resume_run_id={parent_id} is not an experiment's parent run")
    if p.get("budget") != plan.budget or float(p.get("eps", "nan")) != plan.eps:
        raise ConfigError(
            f"resume_run_id={parent_id} ran budget={p.get('budget')} eps={p.get('eps')}; "
            f"resume it with the same budget and eps (asked: budget={plan.budget} eps={plan.eps})"
        )
    if (
        p.get("fold_digest") != plan.fold_digest
        or p.get("test_indices_sha") != plan.test_indices_sha
    ):
        raise ConfigError(
            f"resume_run_id={parent_id} used other folds or test images than this experiment "
            "would (other inv_folds, inv_sets or fold_seed, or other data); start a new experiment"
        )
    out = {}
    for c in children:
        t = c.data.tags
        if {"robustlab.experiment_regime", "robustlab.seed", "robustlab.fold"} <= set(t):
            unit = (
                t["robustlab.experiment_regime"],
                int(t["robustlab.seed"]),
                int(t["robustlab.fold"]),
            )
            out[unit] = c
    return out


def run_worker(study_name: str, url: str, data_dir: str | None = None, max_trials: int = 0) -> int:
    """Train WAITING units until none is left (or `max_trials` were done); the number done."""
    return launch_worker(
        study_name,
        url,
        lambda study: ExperimentPlan.from_study(study, data_dir),
        "create it with robustlab experiment --create-only true (or check the storage URL)",
        max_trials=max_trials,
    )
