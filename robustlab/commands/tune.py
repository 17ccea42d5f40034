"""`robustlab tune`: an Optuna study over the joint regime's batch mixture (and `tune-worker`)."""

from __future__ import annotations

import argparse
import os
import sys

from robustlab.commands import SubParsers, flag, optional
from robustlab.commands.launch_args import add_launch_args, heartbeat_of
from robustlab.config import TUNE_BUDGETS, TUNE_OBJECTIVES, TUNE_PRUNERS, TUNE_SAMPLERS
from robustlab.credentials import STORAGE_ENV, refuse_password_argument


def _timeout(text: str) -> float | None:
    return float(text) if text.strip() else None


def add_parser(sub: SubParsers) -> list[str]:
    """The `tune` options, one declaration each (long because the options are many)."""
    p = sub.add_parser(
        "tune", help="Optuna study over the joint regime's mixture (validation only)"
    )
    p.add_argument("--objective", default="pareto", help=f"one of {list(TUNE_OBJECTIVES)}")
    p.add_argument("--n-trials", type=int, default=20, help="COMPLETE trials in the whole study")
    p.add_argument(
        "--timeout", type=_timeout, default=None, help="seconds per worker (empty: none)"
    )
    p.add_argument("--sampler", default="tpe", help=f"one of {list(TUNE_SAMPLERS)}")
    p.add_argument("--budget", default="default", help=f"one of {list(TUNE_BUDGETS)}")
    p.add_argument("--clean-floor", type=float, default=0.9, help="min validation clean accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-lr", type=flag, default=False, help="also search learning_rate")
    p.add_argument("--tune-warmup", type=flag, default=False, help="also search eps_warmup")
    p.add_argument(
        "--method", default="pgd", help="training method of the attacked rows: pgd | trades"
    )
    p.add_argument("--trades-beta", type=float, default=6.0, help="method=trades: KL weight")
    p.add_argument(
        "--tune-beta",
        type=flag,
        default=False,
        help="method=trades: also search trades_beta (1..10)",
    )
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--data-dir", type=optional, default=None)
    p.add_argument("--pruner", default="median", help=f"scalar mode: one of {list(TUNE_PRUNERS)}")
    p.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads per worker (0: default)"
    )
    p.add_argument("--pin-cpus", type=flag, default=False, help="pin worker i to core i (taskset)")
    p.add_argument(
        "--precision",
        default="auto",
        help="trials' training precision: auto (bf16 where the CPU has it), float32, mixed_bfloat16",
    )
    add_launch_args(
        p, study_default="default tune-<objective>-<budget>", workers_help="worker processes"
    )
    p.set_defaults(func=run)
    w = sub.add_parser(
        "tune-worker",
        help="join a tune study as one worker (tune starts these; or another machine)",
    )
    w.add_argument("--study-name", required=True)
    w.add_argument(
        "--storage",
        type=optional,
        default=None,
        help="the study's RDB URL (default $ROBUSTLAB_OPTUNA_STORAGE)",
    )
    w.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="seeds this worker's sampler (default: a random one, so that workers started "
        "on several machines do not propose the same points)",
    )
    w.add_argument("--timeout", type=_timeout, default=None, help="seconds (empty: none)")
    w.set_defaults(func=run_worker)
    return ["tune", "tune-worker"]


def run(args: argparse.Namespace) -> None:
    from robustlab.config import TuneConfig

    refuse_password_argument(args.storage)
    cfg = TuneConfig(
        objective=args.objective,
        n_trials=args.n_trials,
        timeout=args.timeout,
        study_name=args.study_name,
        storage=args.storage,
        sampler=args.sampler,
        workers=args.workers,
        budget=args.budget,
        clean_floor=args.clean_floor,
        seed=args.seed,
        tune_lr=bool(args.tune_lr),
        tune_warmup=bool(args.tune_warmup),
        method=args.method,
        trades_beta=args.trades_beta,
        tune_beta=bool(args.tune_beta),
        eps=args.eps,
        data_dir=args.data_dir,
        pruner=args.pruner,
        heartbeat=heartbeat_of(args),
        threads=args.threads,
        pin_cpus=bool(args.pin_cpus),
        precision=args.precision,
    ).validate()
    from robustlab.tune.run import run_tune

    run_id = run_tune(cfg, create_only=bool(args.create_only))
    if args.create_only:
        print(
            f"study {cfg.name} created (parent run {run_id}); join it from any machine with: "
            f"robustlab tune-worker --study-name {cfg.name} [--storage URL]",
            file=sys.stderr,
        )
        return
    print(
        f"tune {cfg.name} finished: parent run {run_id} holds trials.csv, front.csv/front.md "
        "and plots/",
        file=sys.stderr,
    )


def run_worker(args: argparse.Namespace) -> None:
    from robustlab.tune.run import run_worker as work

    refuse_password_argument(args.storage)
    if args.timeout is not None and not args.timeout > 0:
        from robustlab.errors import ConfigError

        raise ConfigError(f"timeout must be > 0 seconds (empty = no limit), got {args.timeout}")
    storage = args.storage or os.environ.get(STORAGE_ENV)
    if not storage:
        from robustlab.errors import ConfigError

        raise ConfigError(
            f"tune-worker needs --storage URL or ${STORAGE_ENV} (the study's RDB URL)"
        )
    index = args.worker_index
    if index is None:
        import secrets

        index = 1 + secrets.randbelow(999_999)
    work(args.study_name, storage, index, args.timeout)
