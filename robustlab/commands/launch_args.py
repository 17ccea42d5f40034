"""The launch options `robustlab tune` and `robustlab experiment` share, declared once."""

from __future__ import annotations

import argparse

from robustlab.commands import flag, optional
from robustlab.config import Heartbeat


def add_launch_args(p: argparse.ArgumentParser, *, study_default: str, workers_help: str) -> None:
    """--workers, --storage, --study-name, --create-only and the heartbeat options."""
    p.add_argument("--workers", type=int, default=1, help=workers_help)
    p.add_argument(
        "--storage",
        type=optional,
        default=None,
        help="RDB URL of the study (default $ROBUSTLAB_OPTUNA_STORAGE, then tracking/optuna.db)",
    )
    p.add_argument("--study-name", type=optional, default=None, help=study_default)
    p.add_argument(
        "--create-only",
        type=flag,
        default=False,
        help="create the study and its parent run, run nothing (workers join with <cmd>-worker)",
    )
    p.add_argument("--heartbeat-interval", type=int, default=60, help="seconds")
    p.add_argument(
        "--grace-period",
        type=int,
        default=180,
        help="seconds before a silent trial is retried (and a silent leader replaced)",
    )
    p.add_argument("--max-retry", type=int, default=2)


def heartbeat_of(args: argparse.Namespace) -> Heartbeat:
    return Heartbeat(args.heartbeat_interval, args.grace_period, args.max_retry)
