"""`robustlab report --tables`: every figure and verdict recomputed offline from a published
folder, the committed results reproduced, and bad folders refused in one line."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "cv-default"
BIN = Path(sys.executable).parent
REGIMES = ("perturbation", "joint")
SEEDS = (0, 1, 2)


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _folder(root: Path, seeds=SEEDS) -> Path:
    """A small published folder: 40 examples (10 label-changed) from 20 sources, 50 test images,
    joint right more often than perturbation on the label-changed examples."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    inv, test = [], []
    for s in seeds:
        u = rng.random(40)
        for regime, rate in (("perturbation", 0.2), ("joint", 0.7)):
            for i in range(40):
                changed = i < 10
                inv.append(
                    {
                        "set": "pool",
                        "index": i,
                        "source_index": i // 2,
                        "label_changed": int(changed),
                        "regime": regime,
                        "seed": s,
                        "correct": int(u[i] < (rate if changed else 0.9)),
                    }
                )
            for i in range(50):
                test.append(
                    {"source_index": 1000 + i, "regime": regime, "seed": s, "clean": 1, "pgd40": 1}
                )
    _write(root / "inv_predictions.csv", inv)
    _write(root / "test_outcomes.csv", test)
    folds = [{"set": "pool", "index": i, "source_index": i // 2, "fold": i % 2} for i in range(40)]
    _write(root / "folds.csv", folds)
    run = {
        "regimes": list(REGIMES),
        "seeds": list(seeds),
        "budget": "smoke",
        "inv_folds": 2,
        "inv_sets": ["pool"],
        "parent_run_id": "abc",
        "command": "robustlab experiment --budget smoke",
        "published_as": "results/example",
    }
    (root / "run.json").write_text(json.dumps(run))
    return root


def _report(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "robustlab"), "report", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_the_report_is_recomputed_offline_and_prints_the_verdicts(tmp_path):
    folder = _folder(tmp_path / "pub")
    out = _report("--tables", str(folder))
    assert out.returncode == 0, out.stderr[-2000:]
    report = (folder / "report.md").read_text()
    assert (folder / "forest_plot.png").stat().st_size > 10_000
    # joint gains on label-changed examples: its effect is in the report, with its sample
    assert "| 3a | joint improves label-changed accuracy over perturbation |" in report
    assert "10 (10) / 5 / 3" in report  # 10 label-changed examples, 5 sources, 3 seeds
    assert len(out.stdout.splitlines()) == 3  # one verdict line per claim
    # a compressed table gives the same report
    again = tmp_path / "gz"
    shutil.copytree(folder, again)
    raw = (again / "test_outcomes.csv").read_bytes()
    (again / "test_outcomes.csv").unlink()
    (again / "test_outcomes.csv.gz").write_bytes(gzip.compress(raw))
    out = _report("--tables", str(again), "--out", str(tmp_path / "gz-out"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "gz-out" / "report.md").read_text() == report


@pytest.mark.skipif(
    not (PUBLISHED / "run.json").is_file(),
    reason="results/cv-default is not published yet (the 3-seed run has not finished)",
)
def test_the_committed_results_reproduce_the_committed_report(tmp_path):
    out = _report("--tables", "results/cv-default", "--out", str(tmp_path), cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "report.md").read_text() == (PUBLISHED / "report.md").read_text()


def _broken(root: Path, how: str) -> Path:
    folder = _folder(root)
    inv = folder / "inv_predictions.csv"
    lines = inv.read_text().splitlines(keepends=True)
    if how == "missing":
        (folder / "test_outcomes.csv").unlink()
    elif how == "truncated":
        inv.write_text("".join(lines[:50]) + lines[50][:9])
    elif how == "truncated_gz":
        data = gzip.compress(inv.read_bytes())
        inv.unlink()
        (folder / "inv_predictions.csv.gz").write_bytes(data[: len(data) // 2])
    elif how == "twice":
        inv.write_text("".join(lines) + lines[1])
    elif how == "missing_prediction":
        inv.write_text("".join(lines[:5] + lines[6:]))
    elif how == "seeds":
        run = json.loads((folder / "run.json").read_text())
        (folder / "run.json").write_text(json.dumps(run | {"seeds": [0, 1, 2, 3]}))
    return folder


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "no test_outcomes.csv or test_outcomes.csv.gz"),
        ("truncated", "wrong number of fields (truncated?)"),
        ("truncated_gz", "truncated or corrupt"),
        ("twice", "perturbation seed 0 has pool/0 twice"),
        ("missing_prediction", "perturbation seed 0 misses 1 of 40 items"),
        ("seeds", "seeds ['0', '1', '2'] but run.json says ['0', '1', '2', '3']"),
    ],
)
def test_a_bad_folder_is_refused_in_one_line(tmp_path, how, message):
    folder = _broken(tmp_path / how, how)
    out = _report("--tables", str(folder))
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert message in lines[0] and "Traceback" not in out.stderr
    assert not (folder / "report.md").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--margins", "changed=abc"], "expected metric=number"),
        (["--margins", "changed=1.5"], "must be a number in (0, 1)"),
        (["--margins", "balanced=0"], "must be a number in (0, 1)"),
        (["--margins", "kept=0.1"], "unknown margin 'kept'"),
        (["--verdicts", "true"], "a verdict needs >= 3 seeds"),
    ],
)
def test_bad_margins_and_a_verdict_on_one_seed_are_refused(tmp_path, args, message):
    folder = _folder(tmp_path / "pub", seeds=(0,))
    out = _report("--tables", str(folder), *args)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert message in lines[0]
    assert not (folder / "report.md").exists()


def test_one_seed_reports_effects_without_a_verdict(tmp_path):
    folder = _folder(tmp_path / "pub", seeds=(0,))
    out = _report("--tables", str(folder))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no verdict: one training run" in (folder / "report.md").read_text()
    assert all(
        line.endswith("no verdict") or "no verdict" in line for line in out.stdout.splitlines()
    )


def test_an_unfinished_experiment_is_refused_before_anything_is_written(tmp_path):
    """`--run-id` on a parent run still running (no tables yet): one line naming the resume, no
    output folder; before the fix MLflow's download error came out as a traceback."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("unfinished")
        with mlflow.start_run(tags={"robustlab.kind": "experiment"}) as run:
            mlflow.log_text("x", "folds.csv")  # the folds come first; the tables never came
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
    finally:
        mlflow.set_tracking_uri(None)
    folder = tmp_path / "published"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(
        [str(BIN / "robustlab"), "report", "--run-id", run.info.run_id, "--out", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "no tables/inv_predictions.csv (KILLED)" in lines[0] and "resume" in lines[0]
    assert not folder.exists()
