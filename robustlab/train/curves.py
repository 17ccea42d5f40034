"""The validation curves of a training run, plotted from its logged per-epoch metrics."""

from __future__ import annotations

import tempfile
from pathlib import Path

CURVES = {"val/clean_acc": "clean", "val/pgd_acc": "PGD-10", "val/inv_acc": "invariance"}
CURVES_ARTIFACT = "plots/validation_curves.png"


def log_validation_curves(run_id: str) -> None:
    """Plot every validation accuracy `run_id` logged per epoch (all of them, resumed epochs
    included) against the epoch, and log it as `plots/validation_curves.png` (replaced)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from robustlab.evaluation.plots import line_plot

    client = MlflowClient()
    series = {}
    for key, label in CURVES.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if history:
            series[label] = ([s + 1 for s, _ in history], [v for _, v in history])
    if not series:
        return
    folder, name = CURVES_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = line_plot(
            series,
            Path(tmp) / name,
            xlabel="epoch",
            ylabel="validation accuracy",
            title="Validation accuracy per epoch",
        )
        mlflow.log_artifact(str(path), folder, run_id=run_id)
