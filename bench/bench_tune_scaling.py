"""Weak scaling of `robustlab tune`: 2 workers finishing 2N trials vs 1 worker finishing N.

Each worker is pinned to its own core (`taskset -c i`) with one TensorFlow intra-op and one
inter-op thread, so the ideal is equal wall time (efficiency 1.0). Both studies use the same
budget, objective and seed, in a fresh temporary MLflow store and Optuna SQLite storage. Run on
demand (the machine should be otherwise idle):

    ROBUSTLAB_DATA_DIR=../shared/data python bench/bench_tune_scaling.py [--n 4] [--budget smoke]

Prints the wall time of each study, seconds per COMPLETE trial,
efficiency = T(1 worker, N trials) / T(2 workers, 2N trials), and the same as throughput
(COMPLETE trials per second; the 2-worker study may finish one trial more than 2N).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from robustlab.config import TuneConfig
from robustlab.tune.run import run_tune


def _study(cfg: TuneConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    run_tune(cfg)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage)
    return seconds, len(study.get_trials(states=(TrialState.COMPLETE,)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="trials per worker")
    ap.add_argument("--budget", default="smoke", help="tune budget (smoke | default)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ROBUSTLAB_TRACKING_DIR"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ.pop("MLFLOW_RUN_ID", None)
        base = TuneConfig(
            budget=args.budget,
            storage=f"sqlite:///{Path(tmp) / 'optuna.db'}",
            data_dir=args.data_dir,
            clean_floor=0.0,
            threads=1,
            pin_cpus=True,
        )
        one = TuneConfig(**{**vars(base), "workers": 1, "n_trials": args.n, "study_name": "w1"})
        two = TuneConfig(**{**vars(base), "workers": 2, "n_trials": 2 * args.n, "study_name": "w2"})
        t1, n1 = _study(one)
        t2, n2 = _study(two)
    print(f"1 worker : {n1} trials in {t1:.1f} s ({t1 / n1:.1f} s/trial)")
    print(f"2 workers: {n2} trials in {t2:.1f} s ({t2 / n2:.1f} s/trial per study)")
    print(f"weak-scaling efficiency T1/T2 = {t1 / t2:.2f} (ideal 1.00; N={args.n}, {args.budget})")
    # MaxTrialsCallback lets the second worker finish one trial too many: compare throughput too
    eff = (n2 / t2) / (2 * n1 / t1)
    print(f"throughput efficiency (n2/T2) / (2 n1/T1) = {eff:.2f} (ideal 1.00)")


if __name__ == "__main__":
    main()
