"""`robustlab experiment`: regimes × seeds under one parent run, with the reproduction report."""

from __future__ import annotations

import argparse
import sys

from robustlab.commands import SubParsers, flag, optional
from robustlab.commands.launch_args import add_launch_args, heartbeat_of
from robustlab.credentials import STORAGE_ENV, refuse_password_argument
from robustlab.data.folds import (
    DEFAULT_FOLDS,
    FOLD_SEED,
    HUMAN_SETS,
    MIN_TRAIN_CHANGED,
    check_fold_count,
    check_sets,
)
from robustlab.errors import ConfigError
from robustlab.experiment.budgets import BUDGETS, DEFAULT_REGIMES, check_budget, parse_regimes


def add_parser(sub: SubParsers) -> list[str]:
    """The `experiment` options, one declaration each (long because the options are many)."""
    p = sub.add_parser(
        "experiment", help="run regimes × seeds and write the thesis reproduction report"
    )
    p.add_argument("--budget", default="default", help=f"one of {list(BUDGETS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--regimes", default=",".join(DEFAULT_REGIMES), help="comma-separated")
    p.add_argument("--data-dir", type=optional, default=None)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument(
        "--resume-run-id",
        type=optional,
        default=None,
        help="an interrupted experiment's parent run: reuse its finished regime × seed runs",
    )
    p.add_argument(
        "--pairs-per-worker",
        type=int,
        default=0,
        help="units a local worker trains before a fresh process replaces it (0: no limit, one "
        "start-up per worker; 1: bounded memory)",
    )
    p.add_argument(
        "--inv-folds",
        type=int,
        default=DEFAULT_FOLDS,
        help="source-grouped cross-validation folds over every human-labelled example",
    )
    p.add_argument(
        "--inv-sets",
        default=",".join(HUMAN_SETS),
        help="comma-separated human-labelled sets in the pool (default: all four)",
    )
    p.add_argument("--fold-seed", type=int, default=FOLD_SEED, help="seeds the fold assignment")
    p.add_argument(
        "--allow-small-folds",
        type=flag,
        default=False,
        help=f"accept folds whose training part holds < {MIN_TRAIN_CHANGED} label-changed examples",
    )
    p.add_argument(
        "--verdicts",
        type=flag,
        default=False,
        help="true: refuse fewer than 3 seeds (a verdict needs 3 training runs per regime)",
    )
    add_launch_args(
        p,
        study_default="default experiment-<parent run id>; an existing one is resumed",
        workers_help="local worker processes",
    )
    p.set_defaults(func=run)
    w = sub.add_parser(
        "experiment-worker",
        help="train an experiment study's waiting regime × seed pairs (experiment starts these)",
    )
    w.add_argument("--study-name", required=True)
    w.add_argument(
        "--storage",
        type=optional,
        default=None,
        help="the study's RDB URL (default $ROBUSTLAB_OPTUNA_STORAGE)",
    )
    w.add_argument("--data-dir", type=optional, default=None)
    w.add_argument(
        "--max-trials", type=int, default=0, help="exit after this many pairs (0: until none waits)"
    )
    w.set_defaults(func=run_worker)
    return ["experiment", "experiment-worker"]


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither TensorFlow nor data, before anything is imported or run."""
    import math

    check_budget(args.budget)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    parse_regimes(args.regimes)
    if args.verdicts:
        from robustlab.experiment.design import MIN_SEEDS

        if args.seeds < MIN_SEEDS:
            raise ConfigError(
                f"--verdicts true needs --seeds >= {MIN_SEEDS} (a verdict needs {MIN_SEEDS} "
                f"training runs per regime), got {args.seeds}"
            )
    if not math.isfinite(args.eps) or not 0.0 < args.eps <= 1.0:
        raise ConfigError(f"--eps must lie in (0, 1], got {args.eps}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.pairs_per_worker < 0:
        raise ConfigError(
            f"--pairs-per-worker must be >= 0 (0: no limit), got {args.pairs_per_worker}"
        )
    check_sets(_names(args.inv_sets))
    check_fold_count(args.inv_folds, 10_000)  # the pool's source count is checked with the data


def run(args: argparse.Namespace) -> None:
    from robustlab.data.mnist import resolve_mnist_path
    from robustlab.tracking import configure_tracking

    check_args(args)
    refuse_password_argument(args.storage)
    resolve_mnist_path(args.data_dir)
    configure_tracking()
    from robustlab.experiment.run import Options, run_experiment

    run_id = run_experiment(
        args.budget,
        args.seeds,
        args.regimes,
        args.data_dir,
        args.eps,
        Options(
            workers=args.workers,
            pairs_per_worker=args.pairs_per_worker,
            storage=args.storage,
            study_name=args.study_name,
            create_only=bool(args.create_only),
            resume_run_id=args.resume_run_id,
        ),
        heartbeat=heartbeat_of(args),
        inv_folds=args.inv_folds,
        inv_sets=_names(args.inv_sets),
        fold_seed=args.fold_seed,
        allow_small_folds=bool(args.allow_small_folds),
    )
    if args.create_only:
        return
    print(
        f"experiment {run_id} finished: report.md, forest_plot.png, tables/ (the per-example "
        "tables every figure is computed from) and plots/ are in its artifacts",
        file=sys.stderr,
    )


def run_worker(args: argparse.Namespace) -> None:
    import os

    refuse_password_argument(args.storage)
    if args.max_trials < 0:
        raise ConfigError(f"--max-trials must be >= 0 (0: no limit), got {args.max_trials}")
    storage = args.storage or os.environ.get(STORAGE_ENV)
    if not storage:
        raise ConfigError(
            f"experiment-worker needs --storage URL or ${STORAGE_ENV} (the study's RDB URL)"
        )
    from robustlab.experiment.run import run_worker as work

    work(args.study_name, storage, args.data_dir, args.max_trials)
