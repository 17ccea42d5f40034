"""What the shared services cost per trial, and 1 vs 2 workers on them.

Three smoke studies with the same seed (so the same first trials), each worker pinned to its own
core (`taskset -c i`) with one TensorFlow thread:

1. the SQLite default: SQLite MLflow store + SQLite Optuna storage, 1 worker, N trials;
2. the services (`robustlab services`: an MLflow server on PostgreSQL + PostgreSQL Optuna
   storage, started in a temporary folder on free ports), 1 worker, N trials;
3. the services, 2 workers, 2N trials.

Per-trial time is Optuna's datetime_complete - datetime_start (worker start-up excluded); the
difference of the medians of 1 and 2 is the services' overhead per trial. Run on demand, on an
otherwise idle machine with >= 2 cores:

    ROBUSTLAB_DATA_DIR=../shared/data python bench/bench_services_overhead.py [--n 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from robustlab import services
from robustlab.config import TuneConfig
from robustlab.tune.run import run_tune


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study(cfg: TuneConfig) -> tuple[float, list[float]]:
    """Wall seconds of the study and the seconds of each COMPLETE trial."""
    t0 = time.perf_counter()
    run_tune(cfg)
    wall = time.perf_counter() - t0
    done = optuna.load_study(study_name=cfg.name, storage=cfg.storage).get_trials(
        states=(TrialState.COMPLETE,)
    )
    return wall, [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]


def _line(label: str, wall: float, times: list[float]) -> str:
    med = statistics.median(times)
    return (
        f"{label:<34} {len(times):>2} trials  wall {wall:6.1f} s  per trial median {med:5.1f} s "
        f"(min {min(times):.1f}, max {max(times):.1f})  throughput {len(times) / wall * 60:.2f}/min"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="trials per worker")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 CPU cores")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ROBUSTLAB_TRACKING_DIR"] = tmp
        os.environ.pop("MLFLOW_RUN_ID", None)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        base = {
            "budget": "smoke",
            "data_dir": args.data_dir,
            "clean_floor": 0.0,
            "threads": 1,
            "pin_cpus": True,
        }
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        sqlite = _study(
            TuneConfig(
                **base,
                storage=f"sqlite:///{Path(tmp) / 'optuna.db'}",
                n_trials=args.n,
                study_name="sqlite1",
            )
        )
        svc = services.Services(Path(tmp) / "services", free_port(), free_port())
        try:
            urls = services.start(svc)
            os.environ["MLFLOW_TRACKING_URI"] = urls["MLFLOW_TRACKING_URI"]
            pg = urls["ROBUSTLAB_OPTUNA_STORAGE"]
            one = _study(TuneConfig(**base, storage=pg, n_trials=args.n, study_name="svc1"))
            two = _study(
                TuneConfig(**base, storage=pg, workers=2, n_trials=2 * args.n, study_name="svc2")
            )
        finally:
            services.stop(svc)
            if svc.pg_root.is_relative_to("/var/lib/postgresql"):
                shutil.rmtree(svc.pg_root, ignore_errors=True)
    print(f"load average before: {load:.1f} on {os.cpu_count()} cores")
    print(_line("SQLite store + SQLite Optuna, 1 w", *sqlite))
    print(_line("server + PostgreSQL, 1 worker", *one))
    print(_line("server + PostgreSQL, 2 workers", *two))
    overhead = statistics.median(one[1]) - statistics.median(sqlite[1])
    print(f"services overhead per trial (median): {overhead:+.1f} s")
    eff = (len(two[1]) / two[0]) / (2 * len(one[1]) / one[0])
    print(f"2 vs 1 worker throughput efficiency: {eff:.2f} (ideal 1.00)")


if __name__ == "__main__":
    main()
