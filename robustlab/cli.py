"""The `robustlab` console script. Each sub-command lives in `robustlab.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from robustlab.credentials import apply_services_env, redact_url, refuse_password_argument
from robustlab.errors import RobustlabError, SecretError
from robustlab.quiet import configure as configure_output

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
    "experiment-worker": "experiment",
    "tracking-init": "tracking_init",
    "services": "services",
    "tune": "tune",
    "tune-worker": "tune",
    "register": "register",
    "report": "report",
    "dashboard": "dashboard",
    "carry": "carry",
}


TRAINING = ("vanilla", "perturbation", "invariance", "sequential", "joint")
ERROR_TAG = "robustlab.error"  # set on $MLFLOW_RUN_ID's run when `mlflow run` input is rejected


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `robustlab <command>: error: ...` (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: error: {message}; see `{self.prog} --help`"
        record_error_on_mlflow_run(line)
        print(line, file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="robustlab", description=__doc__)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show TensorFlow's, MLflow's and Keras' own log lines and progress bars",
    )
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


def record_error_on_mlflow_run(line: str) -> None:
    """Under `mlflow run` (which creates the run before we start), tag that run with the error
    line and end it FAILED, so the UI shows why. Never raises."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.set_tag(run_id, ERROR_TAG, _redact_words(line)[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - reporting the error must never hide it
        pass


def refused_secret(argv: list[str]) -> tuple[str, str] | None:
    """(command, storage URL) when the command line carries a storage URL with a password,
    checked before anything else (argparse included): such a URL never travels further."""
    from robustlab.credentials import has_password

    for i, arg in enumerate(argv):
        value = None
        if arg == "--storage" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--storage="):
            value = arg.split("=", 1)[1]
        if value and has_password(value):
            return (argv[0] if argv and not argv[0].startswith("-") else "robustlab"), value
    return None


def _made_for(run, command: str, value: str, client) -> bool:
    """Whether `run` is the run `mlflow run` made for this refused command: its entry point,
    the refused value as its `storage` parameter, nothing logged yet."""
    return (
        run.data.tags.get("mlflow.project.entryPoint") == command
        and run.data.params.get("storage") == value
        and not run.data.metrics
        and not client.list_artifacts(run.info.run_id)
    )


def _redact_words(line: str) -> str:
    """`line` with every URL in it redacted."""
    return " ".join(redact_url(w) if "://" in w else w for w in line.split(" "))


def purge_mlflow_run(command: str, value: str) -> str:
    """Under `mlflow run`, which logged the secret as a parameter before we started: delete that
    run (only when it is recognisably the one made for this command) and, on a SQL store, purge
    it for good (`mlflow gc`); what was done, as a clause."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return ""
    import subprocess

    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        if not _made_for(client.get_run(run_id), command, value, client):
            return f" (run {run_id} is not the run made for this command: left alone)"
        client.delete_run(run_id)
    except Exception:  # noqa: BLE001 - reporting the error must never hide it
        return f" (delete run {run_id}: mlflow logged the parameter)"
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return (
            f" (run {run_id} was deleted; an HTTP server cannot purge it: on the server, run "
            f"mlflow gc --backend-store-uri <its store> --run-ids {run_id})"
        )
    gc = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "gc", "--run-ids", run_id]
    done = subprocess.run([*gc, "--backend-store-uri", uri], capture_output=True).returncode == 0
    return f" (run {run_id}, which logged it, was {'purged' if done else 'deleted'})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    secret = refused_secret(argv)
    if secret is not None:  # first thing, whatever else is wrong with the command
        command, value = secret
        try:
            refuse_password_argument(value)
        except SecretError as exc:
            print(
                f"robustlab {command}: error: {exc}{purge_mlflow_run(command, value)}",
                file=sys.stderr,
            )
        return 2
    args = build_parser().parse_args(argv)
    configure_output(verbose=args.verbose)  # before TensorFlow or MLflow is imported
    try:
        apply_services_env()
        args.func(args)
    except SecretError as exc:  # a password-bearing value from elsewhere (never the argv)
        print(f"robustlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RobustlabError as exc:
        line = f"robustlab {args.command}: error: {exc}"
        record_error_on_mlflow_run(line)
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            "; the last epoch checkpoint is in the run's artifacts and under "
            "tracking/checkpoints/<run_id>/ (resume with resume_run_id)"
            if args.command in TRAINING
            else ""
        )
        print(f"robustlab {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
