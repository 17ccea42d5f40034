"""`robustlab carry export|import`: move an unfinished training run to another tracking store."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustlab.commands import SubParsers
from robustlab.errors import ConfigError


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "carry",
        help="export an unfinished training run (params, metrics, artifacts, last checkpoint) "
        "to a folder, or import one so `--auto-resume` continues it in this store",
        description="export: --run-id ID or --run-name KEY (the newest unfinished run of that "
        "--run-name with a checkpoint) into --out FOLDER. import FOLDER: recreate it here "
        "(nothing is done when this store holds it at that epoch or later).",
    )
    p.add_argument("action", choices=("export", "import"))
    p.add_argument("folder", nargs="?", type=Path, help="import: the bundle folder")
    p.add_argument("--run-id", help="export: the run to export")
    p.add_argument("--run-name", help="export: the --run-name whose unfinished run to export")
    p.add_argument("--out", type=Path, help="export: the bundle folder to write (replaced)")
    p.set_defaults(func=run)
    return ["carry"]


def run(args: argparse.Namespace) -> None:
    from robustlab.train import carry

    if args.action == "import":
        if args.folder is None or args.out or args.run_id or args.run_name:
            raise ConfigError("carry import takes one bundle folder: robustlab carry import FOLDER")
        done = carry.import_run(args.folder)
        what = "imported as" if done.created else "already in this store as"
        print(f"{args.folder}: {what} run {done.run_id} (epoch {done.epoch + 1} done)")
        return
    if args.folder is not None or args.out is None or bool(args.run_id) == bool(args.run_name):
        raise ConfigError(
            "carry export takes --out FOLDER and one of --run-id ID or --run-name KEY"
        )
    run_id = args.run_id or _unfinished(args.run_name)
    bundle = carry.export_run(_known(run_id), args.out)
    print(f"run {run_id} (epoch {bundle['epoch'] + 1} done) exported to {args.out}")


def _unfinished(run_name: str) -> str:
    from robustlab.train.resume import unfinished_run

    found = unfinished_run(run_name, None)
    if found is None:
        raise ConfigError(f"--run-name {run_name}: no unfinished run with a checkpoint to export")
    return found


def _known(run_id: str) -> str:
    """`run_id`, refused (one line) when the configured store has no such run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from robustlab.credentials import redact_url
    from robustlab.tracking import configure_tracking

    configure_tracking()
    try:
        MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types for an unknown id
        raise ConfigError(
            f"--run-id {run_id}: no such run in {redact_url(mlflow.get_tracking_uri())}"
        ) from None
    return run_id
