"""The multi-seed experiment: regimes × seeds as nested runs, aggregated into a report."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlab.commands import experiment as _cli
from robustlab.config import AttackConfig, DataConfig, EvalConfig, MixConfig, RunConfig, TrainConfig
from robustlab.errors import ConfigError
from robustlab.evaluation.plots import line_plot
from robustlab.regimes import Regime, make_regime
from robustlab.report import KEY_METRICS, aggregate, write_comparison, write_report
from robustlab.tracking import start_run
from robustlab.train.runner import Extras, run_training

DEFAULT_REGIMES = tuple(_cli.DEFAULT_REGIMES.split(","))
CURVES = ("val/clean_acc", "val/pgd_acc", "val/inv_acc")


@dataclass(frozen=True)
class Budget:
    """How much compute one regime × seed gets."""

    train_size: int
    eval_size: int
    epochs: int  # single-phase regimes
    ptb_epochs: int  # sequential phases
    inv_epochs: int
    attack_steps: int
    autoattack_size: int
    pgd_restarts: int
    batch_size: int = 128
    patience: int = 3
    curve_size: int = 1000
    curve_points: int = 9
    square_queries: int = 1000


BUDGETS: dict[str, Budget] = {
    # CI: every code path on a tiny real slice, in a few minutes
    "smoke": Budget(
        train_size=512,
        eval_size=200,
        epochs=1,
        ptb_epochs=1,
        inv_epochs=1,
        attack_steps=2,
        autoattack_size=0,
        pgd_restarts=1,
        batch_size=64,
        curve_size=50,
        curve_points=3,
    ),
    # a laptop afternoon (about 3 h on 2 cores): PGD-7 training, lighter strong-attack evaluation
    "default": Budget(
        train_size=0,
        eval_size=0,
        epochs=3,
        ptb_epochs=3,
        inv_epochs=2,
        attack_steps=7,
        autoattack_size=200,
        pgd_restarts=1,
        curve_size=500,
    ),
    # Madry-style: PGD-40 training, full strong-attack evaluation
    "full": Budget(
        train_size=0,
        eval_size=0,
        epochs=30,
        ptb_epochs=30,
        inv_epochs=10,
        attack_steps=40,
        autoattack_size=1000,
        pgd_restarts=10,
        patience=5,
        square_queries=5000,
    ),
}


def parse_regimes(text: str) -> list[str]:
    names = [t.strip().replace(":", "_").replace(" ", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DEFAULT_REGIMES]
    if unknown or not names:
        raise ConfigError(
            f"unknown regime(s) {unknown or text!r}; choose from {list(DEFAULT_REGIMES)}"
        )
    return names


def regime_for(label: str, b: Budget, mix: MixConfig | None = None) -> tuple[Regime, str]:
    """The Regime behind an experiment label, and its invariance label source."""
    if label.startswith("sequential_"):
        order = label.removeprefix("sequential_")
        return make_regime(
            "sequential", order=order, ptb_epochs=b.ptb_epochs, inv_epochs=b.inv_epochs
        ), "human"
    if label == "invariance_target":
        return make_regime("invariance", epochs=b.epochs), "target"
    return make_regime(label, epochs=b.epochs, mix=mix), "human"


def _config(b: Budget, seed: int, data_dir: str | None, eps: float) -> tuple[RunConfig, EvalConfig]:
    attack = AttackConfig(
        eps=eps, steps=b.attack_steps, step_size=2.5 * eps / b.attack_steps, eps_warmup=1.0
    )
    cfg = RunConfig(
        DataConfig(data_dir, b.train_size, b.eval_size),
        TrainConfig(epochs=b.epochs, batch_size=b.batch_size, seed=seed, patience=b.patience),
        MixConfig(),
        attack,
    )
    ev = EvalConfig(
        eps=eps,
        eval_size=b.eval_size,
        autoattack_size=b.autoattack_size,
        pgd_restarts=b.pgd_restarts,
        seed=seed,
        curve_size=b.curve_size,
        curve_points=b.curve_points,
        square_queries=b.square_queries,
    )
    return cfg.validate(), ev.validate()


def run_experiment(
    budget: str = "default",
    seeds: int = 3,
    regimes: str = ",".join(DEFAULT_REGIMES),
    data_dir: str | None = None,
    eps: float = 0.3,
) -> str:
    """Run every regime × seed as a nested run, then log the comparison and report on the parent."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {list(BUDGETS)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    b = BUDGETS[budget]
    labels = parse_regimes(regimes)
    plan = [(label, *regime_for(label, b)) for label in labels]  # validates every regime up front
    _config(b, 0, data_dir, eps)
    params = {"budget": budget, "seeds": seeds, "regimes": ",".join(labels), "eps": eps, **vars(b)}
    with start_run(
        f"experiment-{budget}", params=params, tags={"robustlab.kind": "experiment"}
    ) as parent:
        child_ids: dict[str, list[str]] = {label: [] for label in labels}
        seconds: dict[str, float] = dict.fromkeys(labels, 0.0)
        for seed in range(seeds):
            for label, regime, label_source in plan:
                t0 = time.perf_counter()
                print(f"== experiment: {label} seed {seed} ==", file=sys.stderr, flush=True)
                keras.backend.clear_session()
                cfg, ev = _config(b, seed, data_dir, eps)
                cfg = replace(cfg, train=replace(cfg.train, epochs=regime.phases[0].epochs))
                run_id = run_training(
                    regime,
                    cfg,
                    ev,
                    Extras(
                        inv_label_source=label_source,
                        all_curves=True,
                        nested=True,
                        run_name=f"{label}-seed{seed}",
                        tags={"robustlab.experiment_regime": label, "robustlab.seed": str(seed)},
                    ),
                )
                child_ids[label].append(run_id)
                seconds[label] += time.perf_counter() - t0
        mlflow.log_metrics({f"time/{label}_seconds": s for label, s in seconds.items()})
        _summarize(parent.info.run_id, child_ids, seconds, budget, seeds)
        return parent.info.run_id


assert tuple(BUDGETS) == _cli.BUDGETS


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
