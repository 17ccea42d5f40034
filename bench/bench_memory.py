"""Peak resident memory of every robustlab process (target: <= 2 GiB each). Run on demand.

Runs robustlab commands as subprocesses in a fresh SQLite tracking store and samples the
peak RSS (`VmHWM` in /proc/<pid>/status, the kernel's own high-water mark, so short peaks
between samples are not missed) of the command and of every process it starts (tune and
experiment workers), then prints one line per process:

    ROBUSTLAB_DATA_DIR=../shared/data python bench/bench_memory.py            # small slices
    ROBUSTLAB_DATA_DIR=../shared/data python bench/bench_memory.py --full     # default budgets

`--only NAME` runs one scenario (training, tune, experiment, register).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

LIMIT_GIB = 2.0
GIB = 1024**3


def scenarios(full: bool) -> dict[str, list[list[str]]]:
    """name -> commands run in order (later ones may use what earlier ones logged)."""
    small = [] if full else ["--train-size", "2048", "--eval-size", "1000"]
    study = "bench-memory"
    return {
        "training": [["robustlab", "perturbation", *small, *([] if full else ["--epochs", "1"])]],
        "tune": [
            [
                "robustlab",
                "tune",
                "--budget",
                "default" if full else "smoke",
                "--n-trials",
                "2",
                "--workers",
                "1",
                "--study-name",
                study,
            ]
        ],
        "experiment": [
            [
                "robustlab",
                "experiment",
                "--budget",
                "default" if full else "smoke",
                "--seeds",
                "1",
                *([] if full else ["--regimes", "vanilla,perturbation,joint"]),
            ]
        ],
        "register": [
            [
                "robustlab",
                "tune",
                "--budget",
                "smoke",
                "--n-trials",
                "2",
                "--study-name",
                study + "-reg",
                *([] if full else ["--clean-floor", "0"]),
            ],
            [
                "robustlab",
                "register",
                "--study-name",
                study + "-reg",
                *([] if full else ["--eval-size", "1000"]),
            ],
        ],
    }


def _hwm(proc: psutil.Process) -> int:
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_tracked(cmd: list[str], env: dict[str, str], cwd: str) -> dict[str, tuple[str, int]]:
    """Run `cmd`; {pid: (short command line, peak RSS bytes)} for it and all its descendants."""
    peaks: dict[int, tuple[str, int]] = {}
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    root = psutil.Process(proc.pid)
    tail = b""
    os.set_blocking(proc.stderr.fileno(), False)
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for p in family:
            try:
                name = " ".join(p.cmdline()[1:4]) or p.name()
            except psutil.Error:
                continue
            peak = max(_hwm(p), peaks.get(p.pid, ("", 0))[1])
            peaks[p.pid] = (name, peak)
        chunk = proc.stderr.read() or b""
        tail = (tail + chunk)[-4000:]
        time.sleep(0.2)
    tail = (tail + (proc.stderr.read() or b""))[-4000:]
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail.decode(errors='replace')}")
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="default budgets (tens of minutes)")
    ap.add_argument("--only", default="", help="one scenario: training, tune, experiment, register")
    args = ap.parse_args()
    todo = scenarios(args.full)
    if args.only:
        todo = {args.only: todo[args.only]}
    with tempfile.TemporaryDirectory(prefix="robustlab-bench-memory-") as tmp:
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "ROBUSTLAB_OPTUNA_STORAGE": f"sqlite:///{tmp}/optuna.db",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            env.pop(key, None)
        print(f"{'scenario':<11} {'process':<44} {'peak RSS':>9}  <= {LIMIT_GIB:g} GiB")
        worst = 0
        for name, cmds in todo.items():
            for cmd in cmds:
                t0 = time.perf_counter()
                peaks = run_tracked(cmd, env, tmp)
                seconds = time.perf_counter() - t0
                for proc_name, peak in sorted(peaks.values(), key=lambda v: -v[1]):
                    if peak < 200 * 1024**2:  # helpers (taskset, shells)
                        continue
                    worst = max(worst, peak)
                    ok = "yes" if peak <= LIMIT_GIB * GIB else "NO"
                    print(f"{name:<11} {proc_name[:44]:<44} {peak / GIB:7.2f} GiB  {ok}")
                print(f"{name:<11} ({' '.join(cmd[1:3])}: {seconds:.0f} s wall)")
        print(f"largest process: {worst / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
