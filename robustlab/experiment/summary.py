"""The experiment's summary on its parent run: comparison tables, report, plots."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab.evaluation.plots import line_plot
from robustlab.experiment.plan import ExperimentPlan
from robustlab.experiment.report import KEY_METRICS, aggregate, write_comparison, write_report

CURVES = ("val/clean_acc", "val/pgd_acc", "val/inv_acc")


def summarize(parent_id: str, plan: ExperimentPlan, runs: dict[tuple[str, int], str]) -> None:
    """Aggregate the pairs' runs (`runs`: (regime, seed) -> run id) on the parent run."""
    client = MlflowClient()
    child_ids: dict[str, list[str]] = {label: [] for label in plan.regimes}
    seconds: dict[str, float] = dict.fromkeys(plan.regimes, 0.0)
    for label, seed in plan.pairs:
        info = client.get_run(runs[(label, seed)]).info
        child_ids[label].append(info.run_id)
        seconds[label] += ((info.end_time or info.start_time) - info.start_time) / 1000
    mlflow.log_metrics({f"time/{label}_seconds": s for label, s in seconds.items()})
    _summarize(parent_id, child_ids, seconds, plan.budget, plan.seeds)


def _summarize(
    parent_id: str,
    child_ids: dict[str, list[str]],
    seconds: dict[str, float],
    budget: str,
    seeds: int,
) -> None:
    client = MlflowClient()
    results: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for label, ids in child_ids.items():
        results[label], curves[label] = {}, {c: [] for c in CURVES}
        for run_id in ids:
            run = client.get_run(run_id)
            for metric, value in run.data.metrics.items():
                if metric.startswith("test/") and not metric.endswith(("_ci_low", "_ci_high")):
                    results[label].setdefault(metric, []).append(value)
            for c in CURVES:
                curves[label][c].append(
                    [
                        m.value
                        for m in sorted(client.get_metric_history(run_id, c), key=lambda m: m.step)
                    ]
                )
    agg = aggregate(results)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_comparison(agg, out / "comparison.csv", out / "comparison.md")
        meta = {
            "budget": budget,
            "seeds": str(seeds),
            "parent run": parent_id,
            "wall time per regime (all seeds)": ", ".join(
                f"{k} {v / 60:.1f} min" for k, v in seconds.items()
            ),
        }
        vs = write_report(out / "report.md", agg, results, meta)
        for name in ("comparison.csv", "comparison.md", "report.md"):
            mlflow.log_artifact(str(out / name))
        mlflow.set_tags({f"robustlab.claim{i + 1}": v.verdict for i, v in enumerate(vs)})
        for metric in KEY_METRICS:
            if any(metric in a for a in agg.values()):
                _bar_chart(agg, metric, out / f"bar_{metric.replace('/', '_')}.png")
                mlflow.log_artifact(str(out / f"bar_{metric.replace('/', '_')}.png"), "plots/bars")
        for label, by_curve in curves.items():
            series, bands = {}, {}
            for c, runs in by_curve.items():
                n = min((len(r) for r in runs), default=0)
                if n:
                    arr = np.array([r[:n] for r in runs])
                    x = list(range(1, n + 1))
                    series[c] = (x, arr.mean(axis=0).tolist())
                    bands[c] = (arr.min(axis=0).tolist(), arr.max(axis=0).tolist())
            if series:
                line_plot(
                    series,
                    out / f"curves_{label}.png",
                    xlabel="epoch (all phases)",
                    ylabel="validation accuracy",
                    title=f"{label}: mean over seeds (band: min–max)",
                    bands=bands,
                )
                mlflow.log_artifact(str(out / f"curves_{label}.png"), "plots/curves")
        for label, metrics in agg.items():
            mlflow.log_metrics(
                {
                    f"{label}/{m}_mean": s.mean
                    for m, s in metrics.items()
                    if s.n and m in KEY_METRICS
                }
            )
    print("\n".join(f"{v.claim}: {v.verdict}" for v in vs), file=sys.stderr)


def _bar_chart(agg, metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [r for r in agg if metric in agg[r] and agg[r][metric].n]
    means = [agg[r][metric].mean for r in labels]
    err = [
        [
            0 if np.isnan(agg[r][metric].ci_low) else agg[r][metric].mean - agg[r][metric].ci_low
            for r in labels
        ],
        [
            0 if np.isnan(agg[r][metric].ci_high) else agg[r][metric].ci_high - agg[r][metric].mean
            for r in labels
        ],
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(labels)), means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean over seeds, 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
