"""`robustlab experiment`: regimes × seeds under one parent run, with the reproduction report."""

from __future__ import annotations

import argparse
import sys

from robustlab.commands import optional
from robustlab.errors import ConfigError

BUDGETS = (
    "smoke",
    "default",
    "full",
)  # see robustlab.experiment.BUDGETS (imported lazily: TensorFlow)
DEFAULT_REGIMES = (
    "vanilla,perturbation,invariance,invariance_target,sequential_ptb_inv,sequential_inv_ptb,joint"
)


def add_parser(sub: argparse._SubParsersAction) -> list[str]:
    p = sub.add_parser(
        "experiment", help="run regimes × seeds and write the thesis reproduction report"
    )
    p.add_argument("--budget", default="default", help=f"one of {list(BUDGETS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--regimes", default=DEFAULT_REGIMES, help="comma-separated")
    p.add_argument("--data-dir", type=optional, default=None)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument(
        "--resume-run-id",
        type=optional,
        default=None,
        help="an interrupted experiment's parent run: reuse its finished regime × seed runs",
    )
    p.set_defaults(func=run)
    return ["experiment"]


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither TensorFlow nor data, before anything is imported or run."""
    import math

    if args.budget not in BUDGETS:
        raise ConfigError(f"unknown budget {args.budget!r}; choose one of {list(BUDGETS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    known = DEFAULT_REGIMES.split(",")
    names = [
        t.strip().replace(":", "_").replace(" ", "_") for t in args.regimes.split(",") if t.strip()
    ]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"unknown regime(s) {unknown or args.regimes!r}; choose from {known}")
    if not math.isfinite(args.eps) or not 0.0 < args.eps <= 1.0:
        raise ConfigError(f"--eps must lie in (0, 1], got {args.eps}")


def run(args: argparse.Namespace) -> None:
    from robustlab.data.mnist import resolve_mnist_path
    from robustlab.tracking import configure_tracking

    check_args(args)
    resolve_mnist_path(args.data_dir)
    configure_tracking()
    from robustlab.experiment import run_experiment

    run_id = run_experiment(
        args.budget, args.seeds, args.regimes, args.data_dir, args.eps, args.resume_run_id
    )
    print(
        f"experiment {run_id} finished: report.md, comparison.csv and plots are in its artifacts",
        file=sys.stderr,
    )
