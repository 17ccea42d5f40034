"""The study's summary on its parent run: trials table, front, plots, counts."""

from __future__ import annotations

import csv
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState

from robustlab.config import TuneConfig
from robustlab.evaluation.selection import SCORE_METRIC
from robustlab.launch.launcher import RUN_ATTR, end_lost_runs
from robustlab.tune.plan import CONSTRAINT, PARETO_METRICS

ATTR_COLUMNS = (
    "mix_clean",
    "mix_ptb",
    "mix_inv",
    *PARETO_METRICS,
    "sel/inv_acc",
    SCORE_METRIC,
    RUN_ATTR,
)


def _feasible(t: FrozenTrial) -> bool | None:
    c = t.constraints
    return all(v <= 0 for v in c.values()) if c else None


def _row(t: FrozenTrial, params: list[str]) -> dict[str, object]:
    row: dict[str, object] = {
        "number": t.number,
        "state": t.state.name,
        "feasible": _feasible(t),
        "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
    }
    for i, v in enumerate(t.values or []):
        row[f"value_{i}"] = v
    row.update({p: t.params.get(p) for p in params})
    row.update({k: t.user_attrs.get(k) for k in ATTR_COLUMNS})
    return row


def _write_csv(rows: list[dict[str, object]], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r)) or ["number"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _write_md(rows: list[dict[str, object]], path: Path, title: str) -> None:
    cols = ["number", "mix_clean", "mix_ptb", "mix_inv", *PARETO_METRICS, "sel/inv_acc"]
    cols += ["learning_rate", "eps_warmup", "mlflow_run_id"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)] or ["number"]

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    if not rows:
        lines.append("\n(no feasible complete trial)")
    path.write_text("\n".join(lines) + "\n")


def _plot(make: Callable[[], object], path: Path) -> bool:
    """Save one optuna matplotlib plot; a plot Optuna cannot draw yet (too few trials) is skipped."""
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = make()
        fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
        fig.savefig(path, dpi=90, bbox_inches="tight")
        return True
    except Exception as exc:  # noqa: BLE001 - e.g. importances need 2+ complete trials
        print(f"note: {path.name} skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False
    finally:
        plt.close("all")


def _plots(study: optuna.Study, cfg: TuneConfig, out: Path) -> list[Path]:
    from optuna.visualization import matplotlib as ov

    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    jobs: dict[str, Callable[[], object]] = {}
    for i, name in enumerate(names):
        tag = name.replace("/", "_")

        def target(t: FrozenTrial, i: int = i) -> float:
            return t.values[i]

        jobs[f"history_{tag}.png"] = lambda target=target, name=name: ov.plot_optimization_history(
            study, target=target, target_name=name
        )
        jobs[f"importances_{tag}.png"] = lambda target=target, name=name: ov.plot_param_importances(
            study, target=target, target_name=name
        )
        jobs[f"parallel_coordinates_{tag}.png"] = lambda target=target, name=name: (
            ov.plot_parallel_coordinate(study, target=target, target_name=name)
        )
    if cfg.objective == "pareto":
        jobs["pareto_front.png"] = lambda: ov.plot_pareto_front(
            study, include_dominated_trials=True
        )
    else:
        jobs["intermediate_values.png"] = lambda: ov.plot_intermediate_values(study)
    return [out / n for n, make in jobs.items() if _plot(make, out / n)]


def summarize(study: optuna.Study, cfg: TuneConfig) -> None:
    """Log trials.csv, front.csv/front.md, plots and counts to the active (parent) run."""
    trials = study.get_trials(deepcopy=False)
    end_lost_runs(study, set(), "robustlab.tune.worker_lost")
    params = sorted({p for t in trials for p in t.params})
    rows = [_row(t, params) for t in trials]
    if cfg.objective == "pareto":
        front = list(study.best_trials)
        title = "Pareto front of feasible trials (sel/clean_acc, sel/pgd_acc, sel/inv_bal_acc)"
    else:
        try:
            front = [study.best_trial]
        except ValueError:
            front = []
        title = "Best feasible trial (sel/score)"
    front_rows = [_row(t, params) for t in sorted(front, key=lambda t: t.number)]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    mlflow.log_metrics({f"tune/n_{k}": float(v) for k, v in counts.items()})
    mlflow.log_metric("tune/front_size", float(len(front)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _write_csv(rows, out / "trials.csv")
        _write_csv(front_rows, out / "front.csv")
        _write_md(front_rows, out / "front.md", title)
        for name in ("trials.csv", "front.csv", "front.md"):
            mlflow.log_artifact(str(out / name))
        for path in _plots(study, cfg, out):
            mlflow.log_artifact(str(path), "plots")
    print(
        f"study {study.study_name}: "
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + f"; front: {[t.number for t in front]} (constraint {CONSTRAINT}: "
        f"sel/clean_acc >= {cfg.clean_floor})",
        file=sys.stderr,
    )
