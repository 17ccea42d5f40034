"""The multi-seed experiment: regimes × seeds as nested runs, aggregated into a report."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from robustlab.commands import experiment as _cli
from robustlab.config import AttackConfig, DataConfig, EvalConfig, MixConfig, RunConfig, TrainConfig
from robustlab.data.mnist import load_mnist, subsample
from robustlab.errors import ConfigError
from robustlab.evaluation.indices import EVALUATED_ARTIFACT
from robustlab.evaluation.plots import line_plot
from robustlab.invariance.leakage import excluded_test_indices
from robustlab.regimes import Regime, make_regime
from robustlab.report import KEY_METRICS, aggregate, write_comparison, write_report
from robustlab.tracking import configure_tracking, start_run
from robustlab.train.inv_pool import load_inv_pools
from robustlab.train.runner import Extras, run_training

DEFAULT_REGIMES = tuple(_cli.DEFAULT_REGIMES.split(","))
TEST_SUBSET_SEED = 0  # the experiment's test subset is fixed per experiment, not per training seed
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
    pgd_engine: str = "robustlab"  # evaluation PGD: in-graph (same result as ART, about 2x faster)


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
    # a laptop afternoon (under 2 h on 2 cores): short PGD-5 training, full-test-set PGD-40,
    # AutoAttack on a seeded subset as the strong attack
    "default": Budget(
        train_size=0,
        eval_size=0,
        epochs=2,
        ptb_epochs=2,
        inv_epochs=1,
        attack_steps=5,
        autoattack_size=200,
        pgd_restarts=0,
        curve_size=300,
        curve_points=5,
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
        pgd_engine="art",
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
        pgd_engine=b.pgd_engine,
    )
    return cfg.validate(), ev.validate()


def run_experiment(
    budget: str = "default",
    seeds: int = 3,
    regimes: str = ",".join(DEFAULT_REGIMES),
    data_dir: str | None = None,
    eps: float = 0.3,
    resume_run_id: str | None = None,
) -> str:
    """Run every regime × seed as a nested run, then log the comparison and report on the parent.

    `resume_run_id`: an earlier (interrupted) experiment with the same budget and eps; its
    FINISHED children are moved under the new parent and reused instead of being trained again.
    """
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {list(BUDGETS)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    b = BUDGETS[budget]
    labels = parse_regimes(regimes)
    plan = [(label, *regime_for(label, b)) for label in labels]  # validates every regime up front
    _config(b, 0, data_dir, eps)
    test_indices = shared_test_indices({s for _, _, s in plan}, b.eval_size, data_dir)
    digest = indices_digest(test_indices)
    params = {
        "budget": budget,
        "seeds": seeds,
        "regimes": ",".join(labels),
        "eps": eps,
        **vars(b),
        "test_subset_seed": TEST_SUBSET_SEED,
        "n_test": len(test_indices),
        "test_indices_sha": digest,
    }
    done = finished_children(resume_run_id, budget, eps, digest) if resume_run_id else {}
    tags = {"robustlab.kind": "experiment"}
    if resume_run_id:
        tags["robustlab.resumed_from"] = resume_run_id
    with start_run(f"experiment-{budget}", params=params, tags=tags) as parent:
        child_ids: dict[str, list[str]] = {label: [] for label in labels}
        seconds: dict[str, float] = dict.fromkeys(labels, 0.0)
        client = MlflowClient()
        for seed in range(seeds):
            for label, regime, label_source in plan:
                if (label, seed) in done:
                    old = done[(label, seed)]
                    print(
                        f"== experiment: {label} seed {seed}: reusing run {old.info.run_id} ==",
                        file=sys.stderr,
                        flush=True,
                    )
                    client.set_tag(old.info.run_id, "mlflow.parentRunId", parent.info.run_id)
                    client.set_tag(old.info.run_id, "robustlab.moved_from_parent", resume_run_id)
                    child_ids[label].append(old.info.run_id)
                    seconds[label] += (old.info.end_time - old.info.start_time) / 1000
                    continue
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
                        test_indices=test_indices,
                    ),
                )
                child_ids[label].append(run_id)
                seconds[label] += time.perf_counter() - t0
        mlflow.log_metrics({f"time/{label}_seconds": s for label, s in seconds.items()})
        mlflow.log_dict({"mnist_split": "test", "indices": list(test_indices)}, EVALUATED_ARTIFACT)
        _summarize(parent.info.run_id, child_ids, seconds, budget, seeds)
        return parent.info.run_id


assert tuple(BUDGETS) == _cli.BUDGETS


def shared_test_indices(
    label_sources: set[str], eval_size: int, data_dir: str | None
) -> tuple[int, ...]:
    """The MNIST test images every regime × seed of one experiment is evaluated on.

    The test set minus the union of the sources every run excludes (the invariance pools of
    every label source the experiment trains with, training and validation), then a subset of
    `eval_size` (0 = all) seeded by TEST_SUBSET_SEED: one set, whatever the regime and seed.
    """
    mnist = load_mnist(data_dir)
    excluded = np.unique(
        np.concatenate(
            [
                excluded_test_indices(load_inv_pools(data_dir, source).used_sets)
                for source in sorted(label_sources)
            ]
            or [np.empty(0, np.int64)]
        )
    )
    test = subsample(mnist.test.without_sources(excluded), eval_size, seed=TEST_SUBSET_SEED)
    return tuple(int(i) for i in test.source_index)


def indices_digest(indices: tuple[int, ...]) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def finished_children(
    parent_id: str, budget: str, eps: float, test_indices_sha: str | None = None
) -> dict[tuple[str, int], Run]:
    """The FINISHED regime × seed children of experiment `parent_id`, checked to be comparable.

    With `test_indices_sha`, the earlier experiment must have evaluated on the same test images.
    """
    configure_tracking()  # before the parent run exists: look in the same store it will use
    client = MlflowClient()
    try:
        parent = client.get_run(parent_id)
    except MlflowException as exc:
        raise ConfigError(
            f"resume_run_id={parent_id}: no such run in this tracking store; "
            "pass the run id of an earlier experiment's parent run"
        ) from exc
    p = parent.data.params
    if parent.data.tags.get("robustlab.kind") != "experiment":
        raise ConfigError(f"resume_run_id={parent_id} is not an experiment's parent run")
    if p.get("budget") != budget or float(p.get("eps", "nan")) != eps:
        raise ConfigError(
            f"resume_run_id={parent_id} ran budget={p.get('budget')} eps={p.get('eps')}; "
            f"resume it with the same budget and eps (asked: budget={budget} eps={eps})"
        )
    if test_indices_sha is not None and p.get("test_indices_sha") != test_indices_sha:
        raise ConfigError(
            f"resume_run_id={parent_id} evaluated on other test images than this experiment "
            "would (it predates the shared test set, or its data differ); start a new experiment"
        )
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
    )
    return {
        (c.data.tags["robustlab.experiment_regime"], int(c.data.tags["robustlab.seed"])): c
        for c in children
        if "robustlab.experiment_regime" in c.data.tags and "robustlab.seed" in c.data.tags
    }


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
