"""`robustlab dashboard`: optuna-dashboard on the study storage named by the environment.

The storage URL (it may carry a password) comes from $ROBUSTLAB_OPTUNA_STORAGE or the services'
env file, never from the command line, where `ps` would show it to every user.
"""

from __future__ import annotations

import argparse
import sys

from robustlab.commands import SubParsers


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "dashboard",
        help="optuna-dashboard on $ROBUSTLAB_OPTUNA_STORAGE (else tracking/optuna.db)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=run)
    return ["dashboard"]


def run(args: argparse.Namespace) -> None:
    from optuna_dashboard import run_server

    from robustlab.launch.storage import open_storage, redact_url, storage_url

    url = storage_url()
    storage = open_storage(url)  # a bad URL: one line, without its password
    print(
        f"optuna-dashboard on {redact_url(url)}: http://{args.host}:{args.port}/",
        file=sys.stderr,
        flush=True,
    )
    run_server(storage, host=args.host, port=args.port)
