"""`robustlab services start|stop|status`: local PostgreSQL + MLflow server for many workers."""

from __future__ import annotations

import argparse
import sys

from robustlab.commands import SubParsers
from robustlab.credentials import redact_url


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "services",
        help="start/stop a local PostgreSQL and an MLflow server on it (make services)",
        description="Idempotent: a second start reuses what runs. Writes tracking/services.env.",
    )
    p.add_argument("action", choices=("start", "stop", "status"))
    p.set_defaults(func=run)
    return ["services"]


def run(args: argparse.Namespace) -> None:
    from robustlab import services

    svc = services.Services.from_env()
    if args.action == "start":
        values = services.start(svc)
        for key, value in values.items():
            shown = "***" if key.endswith("PASSWORD") else redact_url(value)
            print(f"{key}={shown}")
        print(f"written to {svc.env_file} (source it in every worker: set -a; . {svc.env_file})")
    elif args.action == "stop":
        stopped = services.stop(svc)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        for name, up in services.status(svc).items():
            print(f"{name}: {'running' if up else 'stopped'}")
    sys.stdout.flush()
