"""The `robustlab` console script. Each sub-command lives in `robustlab.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from robustlab.errors import RobustlabError

# sub-command name -> module in robustlab.commands exposing `add_parser(subparsers)`
COMMANDS = {
    "vanilla": "train",
    "perturbation": "train",
    "invariance": "train",
    "sequential": "train",
    "joint": "train",
    "evaluate": "evaluate",
    "generate": "generate",
    "label": "label",
    "experiment": "experiment",
    "tracking-init": "tracking_init",
    "tune": "tune",
    "tune-worker": "tune",
    "register": "register",
}


TRAINING = ("vanilla", "perturbation", "invariance", "sequential", "joint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    added: set[str] = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(f"robustlab.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"robustlab.commands.{module_name}":
                continue  # command not built yet
            raise
        added.update(module.add_parser(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RobustlabError as exc:
        print(f"robustlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            "; the last epoch checkpoint is in the run's artifacts (resume with resume_run_id)"
            if args.command in TRAINING
            else ""
        )
        print(f"robustlab {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
