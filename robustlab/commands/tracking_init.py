"""`robustlab tracking-init`: create the tracking store and experiment before `mlflow run`."""

from __future__ import annotations

import argparse

from robustlab.commands import SubParsers
from robustlab.credentials import redact_url
from robustlab.tracking import DEFAULT_EXPERIMENT, configure_tracking, ensure_experiment


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "tracking-init", help="create the tracking store and the experiment; print the URI"
    )
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    p.set_defaults(func=run)
    return ["tracking-init"]


def run(args: argparse.Namespace) -> None:
    uri = configure_tracking()
    exp_id = ensure_experiment(args.experiment)
    print(f"tracking URI {redact_url(uri)}, experiment {args.experiment!r} (id {exp_id})")
