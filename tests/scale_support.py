"""Helpers for the scale-out tests: real services, workers that share nothing but two URLs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import DATA_DIR, REPO, free_port

BIN = Path(sys.executable).parent
needs_postgres = pytest.mark.skipif(
    not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
    reason="PostgreSQL is not installed (.ci/run installs it)",
)


@dataclass
class Live:
    """Running services: the two URLs workers get, and where the services keep their state."""

    tracking_uri: str
    storage: str
    folder: Path  # ROBUSTLAB_TRACKING_DIR of the services
    env: dict[str, str]

    @property
    def svc(self):
        from robustlab.services import Services

        return Services(
            self.folder / "services",
            int(self.env["ROBUSTLAB_PG_PORT"]),
            int(self.env["ROBUSTLAB_SERVICES_PORT"]),
        )

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def start_services(folder: Path) -> Live:
    folder.mkdir(parents=True)
    env = {
        **os.environ,
        "ROBUSTLAB_TRACKING_DIR": str(folder),
        "ROBUSTLAB_PG_PORT": str(free_port()),
        "ROBUSTLAB_SERVICES_PORT": str(free_port()),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        [str(BIN / "robustlab"), "services", "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    values = dict(line.split("=", 1) for line in (folder / "services.env").read_text().splitlines())
    return Live(values["MLFLOW_TRACKING_URI"], values["ROBUSTLAB_OPTUNA_STORAGE"], folder, env)


def stop_services(live: Live) -> None:
    subprocess.run([str(BIN / "robustlab"), "services", "stop"], env=live.env, timeout=120)
    pg_root = live.svc.pg_root
    if pg_root.is_relative_to("/var/lib/postgresql"):  # see Services.pg_root
        shutil.rmtree(pg_root, ignore_errors=True)


def machine(root: Path, name: str, live: Live, **extra: str) -> tuple[Path, dict[str, str]]:
    """A working directory and an environment as on another machine: its own cwd and HOME,
    the code and MNIST, and only the two URLs of the shared services."""
    cwd = root / name
    (cwd / "home").mkdir(parents=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd / "home"),
        "PYTHONPATH": str(REPO),
        "ROBUSTLAB_DATA_DIR": str(DATA_DIR),
        "MLFLOW_TRACKING_URI": live.tracking_uri,
        "ROBUSTLAB_OPTUNA_STORAGE": live.storage,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # one core per worker: the test machine is small and shared
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    return cwd, env


def robustlab(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600):
    return subprocess.run(
        [str(BIN / "robustlab"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def worker(
    name: str, cwd: Path, env: dict[str, str], command: str = "tune-worker"
) -> subprocess.Popen:
    """`robustlab <command> --study-name NAME` (tune-worker or experiment-worker), logging to
    cwd/worker.log."""
    log = open(cwd / "worker.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(BIN / "robustlab"), command, "--study-name", name],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(name="reap")
def reap_fixture():
    """Worker processes a test started; killed at teardown if a failed assertion left them."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tune_args(name: str, n_trials: int, *extra: str) -> list[str]:
    """A smoke study (tiny trials) on the storage in $ROBUSTLAB_OPTUNA_STORAGE."""
    return [
        "tune",
        "--budget",
        "smoke",
        "--clean-floor",
        "0",
        "--study-name",
        name,
        "--n-trials",
        str(n_trials),
        "--data-dir",
        str(DATA_DIR),
        *extra,
    ]


def wait_for_running_trial(study: optuna.Study, proc: subprocess.Popen, timeout: float = 300):
    """The first RUNNING trial once its MLflow run exists (its first epoch has been logged)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = study.get_trials(states=(TrialState.RUNNING,))
        with_run = [t for t in running if t.user_attrs.get("mlflow_run_id")]
        if with_run:
            return with_run[0]
        if proc.poll() is not None:
            pytest.fail(f"the worker exited ({proc.returncode}) before its first epoch")
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the worker never reached its first epoch")


def trial_runs(live: Live, parent_id: str) -> list:
    client = live.client()
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def running_runs(live: Live, study: str) -> list:
    """The runs of `study` (its parents and trials) that are still RUNNING."""
    client = live.client()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`robustlab.study` = '{study}'")
    return [r for r in runs if r.info.status == "RUNNING"]
