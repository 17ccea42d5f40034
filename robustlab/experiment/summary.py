"""The experiment's summary on its parent run: the per-example tables, the figures computed from
them, report.md, the forest plot, validation curves, and tags with the claims' verdicts."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab.evaluation.plots import line_plot
from robustlab.experiment.estimates import ALL, Figures, compute_figures
from robustlab.experiment.plan import NO_FOLD, ExperimentPlan, Unit
from robustlab.experiment.published import (
    conditions,
    experiment_command,
    meta_lines,
    reproduce_lines,
    unit_times,
)
from robustlab.experiment.report import forest_plot, write_report
from robustlab.experiment.tables import INV_TABLE, TEST_TABLE, gather, log_tables

CURVES = ("val/clean_acc", "val/pgd_acc", "val/inv_acc")


def summarize(parent_id: str, plan: ExperimentPlan, runs: dict[Unit, str], wall: float) -> None:
    """Gather the units' per-example outcomes (`runs`: unit -> run id), compute every figure,
    and log the tables, report and plots on the (active) parent run."""
    inv_rows, test_rows = gather(runs)
    fig = compute_figures(inv_rows, test_rows, plan.regimes, list(range(plan.seeds)))
    client = MlflowClient()
    total, share, _ = unit_times([client.get_run(r) for r in runs.values()])
    seconds = {label: total.get(label, 0.0) for label in plan.regimes}
    record = {
        **plan.record(),
        "parent_run_id": parent_id,
        "regimes": list(plan.regimes),
        "seeds": list(range(plan.seeds)),
        "inv_sets": list(plan.inv_sets),
        "wall_seconds": wall,
        "unit_seconds": seconds,
        "eval_share": share,
        "study_name": plan.study_name,
        "command": experiment_command(plan.record(), plan.study_name),
        **conditions(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        log_tables([(INV_TABLE, inv_rows), (TEST_TABLE, test_rows)], out)
        write_report(
            out / "report.md",
            fig,
            meta_lines(record),
            reproduce_lines(record, f"results/experiment-{parent_id[:8]}"),
        )
        mlflow.log_artifact(str(out / "report.md"))
        mlflow.log_artifact(str(forest_plot(fig, out / "forest_plot.png")))
        for path in _curves(runs, plan, out):
            mlflow.log_artifact(str(path), "plots/curves")
    mlflow.set_tags({f"robustlab.claim{c.claim.key}": c.verdict for c in fig.claims})
    mlflow.log_metrics({f"time/{label}_seconds": s for label, s in seconds.items()})
    mlflow.log_metrics(_key_metrics(fig))
    print("\n".join(f"{c.claim.text}: {c.verdict}" for c in fig.claims), file=sys.stderr)


def _key_metrics(fig: Figures) -> dict[str, float]:
    out = {}
    for regime in fig.regimes:
        for metric, value in fig.test.get(regime, {}).items():
            out[f"{regime}/{metric}_acc"] = value[0]
        for metric, value in fig.inv.get(regime, {}).get(ALL, {}).items():
            out[f"{regime}/inv_{metric}_acc"] = value[0]
    return {k: v for k, v in out.items() if np.isfinite(v)}


def _curves(runs: dict[Unit, str], plan: ExperimentPlan, out: Path) -> list[Path]:
    """Per regime: validation clean / PGD / INV accuracy per epoch, mean over seeds and folds
    (band: min–max)."""
    client = MlflowClient()
    paths = []
    for label in plan.regimes:
        ids = [run_id for (lab, _, _), run_id in runs.items() if lab == label]
        series, bands = {}, {}
        for c in CURVES:
            histories = [
                [m.value for m in sorted(client.get_metric_history(r, c), key=lambda m: m.step)]
                for r in ids
            ]
            n = min((len(h) for h in histories), default=0)
            if n:
                arr = np.array([h[:n] for h in histories])
                series[c] = (list(range(1, n + 1)), arr.mean(axis=0).tolist())
                bands[c] = (arr.min(axis=0).tolist(), arr.max(axis=0).tolist())
        if series:
            units = "seeds" if plan.folds_of(label) == [NO_FOLD] else "seeds and folds"
            paths.append(
                line_plot(
                    series,
                    out / f"curves_{label}.png",
                    xlabel="epoch (all phases)",
                    ylabel="validation accuracy",
                    title=f"{label}: mean over {units} (band: min–max)",
                    bands=bands,
                )
            )
    return paths
