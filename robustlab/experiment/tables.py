"""The experiment's two per-example tables, gathered from its child runs' artifacts.

Every child run logs `inv_predictions.csv` (its out-of-fold predictions on the human-labelled
examples it never trained or selected on) and `per_example.csv` (its outcome on every shared
test image). The parent joins them into the invariance table (one row per example, regime and
seed) and the test table (one row per test image, regime and seed; the fold models of a regime
trained once per fold are averaged, AutoAttack coming from the fold-0 model alone). See `robustlab.experiment.estimates` for what is computed
from them.
"""

from __future__ import annotations

import csv
import gzip
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import mlflow
import numpy as np

from robustlab.errors import RobustlabError
from robustlab.evaluation.indices import PER_EXAMPLE_ARTIFACT
from robustlab.evaluation.validation import INV_PREDICTIONS_ARTIFACT

INV_TABLE = "inv_predictions"
TEST_TABLE = "test_outcomes"
TEST_COLUMNS = ("clean", "pgd40", "autoattack")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file (`.csv.gz`: gzip-compressed)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _artifact(run_id: str, name: str, folder: Path) -> list[dict[str, str]]:
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=name, dst_path=str(folder)
        )
    except Exception as exc:  # noqa: BLE001 - a missing artifact: the run did not finish its job
        raise RobustlabError(
            f"run {run_id} has no {name} ({type(exc).__name__}); it predates cross-validated "
            "experiments or did not finish: train it again"
        ) from None
    return read_csv(path)


def gather(
    runs: dict[tuple[str, int, int], str],
) -> tuple[list[dict], list[dict]]:
    """(invariance table, test table) from the runs of every (regime, seed, fold)."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # 2 downloads per run
    inv: list[dict] = []
    outcomes: dict[tuple[str, int], dict[int, list[dict[str, str]]]] = defaultdict(dict)
    with tempfile.TemporaryDirectory(prefix="robustlab-tables-") as tmp:
        for (regime, seed, fold), run_id in sorted(runs.items()):
            folder = Path(tmp) / run_id
            folder.mkdir()
            for row in _artifact(run_id, INV_PREDICTIONS_ARTIFACT, folder):
                inv.append(
                    {
                        **row,
                        "regime": regime,
                        "seed": seed,
                        "fold": fold,
                        "run_id": run_id,
                    }
                )
            outcomes[(regime, seed)][fold] = _artifact(run_id, PER_EXAMPLE_ARTIFACT, folder)
    return inv, _test_table(outcomes)


def _test_table(outcomes: dict[tuple[str, int], dict[int, list[dict[str, str]]]]) -> list[dict]:
    """One row per (image, regime, seed): each outcome averaged over the regime's fold models."""
    rows = []
    for (regime, seed), by_fold in sorted(outcomes.items()):
        tables = list(by_fold.values())
        images = [int(r["source_index"]) for r in tables[0]]
        for t in tables[1:]:
            if [int(r["source_index"]) for r in t] != images:
                raise RobustlabError(
                    f"{regime} seed {seed}: its fold models were judged on different test images"
                )
        for i, image in enumerate(images):
            row: dict[str, object] = {
                "source_index": image,
                "label": int(tables[0][i]["label"]),
                "regime": regime,
                "seed": seed,
                "models": len(tables),
            }
            for column in TEST_COLUMNS:  # AutoAttack: the fold-0 model only
                values = [t[i].get(column, "") for t in tables]
                known = [float(v) for v in values if v not in ("", None)]
                row[column] = float(np.mean(known)) if known else ""
            rows.append(row)
    return rows


def log_tables(tables: Iterable[tuple[str, list[dict]]], out: Path) -> None:
    """Each table as CSV and as an MLflow table (the UI's artifact view shows it)."""
    for name, rows in tables:
        mlflow.log_artifact(str(write_csv(rows, out / f"{name}.csv")), "tables")
        if rows:
            columns = {k: [r[k] for r in rows] for k in rows[0]}
            mlflow.log_table(columns, artifact_file=f"tables/{name}.json")
