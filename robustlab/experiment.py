"""The multi-seed experiment: regimes × seeds as child runs, aggregated into a report.

The parent process validates, creates the parent run and an Optuna study with one enqueued trial
per regime × seed, starts worker processes (`robustlab.experiment_worker`) that train the pairs,
and summarizes; it never trains (nor imports TensorFlow).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from robustlab.commands import experiment as _cli
from robustlab.config import (
    AttackConfig,
    DataConfig,
    EvalConfig,
    MixConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
)
from robustlab.data.mnist import Split, load_raw_mnist, subsample
from robustlab.errors import ConfigError, RobustlabError
from robustlab.evaluation.indices import EVALUATED_ARTIFACT
from robustlab.evaluation.plots import line_plot
from robustlab.experiment_worker import (
    ATTR_KIND,
    ATTR_PLAN,
    KIND,
    REGIME_ATTR,
    RUN_ATTR,
    SEED_ATTR,
    pair_distributions,
)
from robustlab.invariance.leakage import excluded_test_indices
from robustlab.regimes import Regime, make_regime
from robustlab.report import KEY_METRICS, aggregate, write_comparison, write_report
from robustlab.tracking import configure_tracking, start_run
from robustlab.train.inv_pool import load_inv_pools
from robustlab.tune.study import ATTR_EXPERIMENT, ATTR_PARENT, _redact, open_storage, storage_url

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
    square_alone: bool = False  # Square beside AutoAttack (which runs Square too); `full`: True


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
        square_alone=True,
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


def _config(
    b: Budget, seed: int, data_dir: str | None, eps: float, check_model: bool = True
) -> tuple[RunConfig, EvalConfig]:
    """One pair's configuration (`check_model=False`: no Keras import, for the parent)."""
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
        square_alone=b.square_alone,
        pgd_engine=b.pgd_engine,
    )
    return cfg.validate(check_model), ev.validate()


def run_experiment(
    budget: str = "default",
    seeds: int = 3,
    regimes: str = ",".join(DEFAULT_REGIMES),
    data_dir: str | None = None,
    eps: float = 0.3,
    resume_run_id: str | None = None,
    *,
    workers: int = 1,
    pairs_per_worker: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    create_only: bool = False,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    max_retry: int = 2,
) -> str:
    """Run every regime × seed as a child run, then log the comparison and report on the parent.

    The pairs are the enqueued trials of an Optuna study on `storage` (as tune's: the argument,
    else $ROBUSTLAB_OPTUNA_STORAGE, else tracking/optuna.db), named `study_name` (default
    `experiment-<parent run id>`); `workers` local `robustlab experiment-worker` processes (a
    fresh one per `pairs_per_worker` pairs: memory stays bounded) train them, and workers on other machines may join. This process
    never trains. `create_only`: create the parent run and the study, train nothing. An existing
    `study_name` (same budget, eps, regimes, seeds) is resumed: a new parent adopts its COMPLETE
    pairs, and the missing ones are trained. `resume_run_id`: an earlier experiment's parent run
    (same budget and eps) whose FINISHED children are adopted instead of trained again.
    """
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {list(BUDGETS)}")
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if workers < 1 or pairs_per_worker < 1:
        raise ConfigError(
            f"workers and pairs_per_worker must be >= 1, got {workers} and {pairs_per_worker}"
        )
    heartbeat = TuneConfig(
        storage=storage,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        max_retry=max_retry,
    ).validate()
    b = BUDGETS[budget]
    labels = parse_regimes(regimes)
    plan = [(label, *regime_for(label, b)) for label in labels]  # validates every regime up front
    _config(b, 0, data_dir, eps, check_model=False)  # the parent never imports TensorFlow
    label_sources = sorted({s for _, _, s in plan})
    test_indices = shared_test_indices(set(label_sources), b.eval_size, data_dir)
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
    url = storage_url(heartbeat)
    store = open_storage(url, heartbeat)
    plan_attr = {
        "budget": budget,
        "eps": eps,
        "regimes": ",".join(labels),
        "seeds": seeds,
        "label_sources": label_sources,
        "test_indices_sha": digest,
        "n_test": len(test_indices),
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "max_retry": max_retry,
    }
    old_study = _existing_study(store, study_name, plan_attr) if study_name else None
    done = finished_children(resume_run_id, budget, eps, digest) if resume_run_id else {}
    tags = {"robustlab.kind": "experiment"}
    if resume_run_id:
        tags["robustlab.resumed_from"] = resume_run_id
    if old_study is not None:
        tags["robustlab.resumed_study"] = "true"
    with start_run(f"experiment-{budget}", params=params, tags=tags) as parent:
        parent_id = parent.info.run_id
        name = study_name or f"experiment-{parent_id}"
        study = optuna.create_study(
            study_name=name, storage=store, direction="minimize", load_if_exists=True
        )
        study.set_metric_names(["train_seconds"])
        for key, value in {
            ATTR_KIND: KIND,
            ATTR_PARENT: parent_id,
            ATTR_EXPERIMENT: parent.info.experiment_id,
            ATTR_PLAN: json.dumps(plan_attr),
        }.items():
            study.set_user_attr(key, value)
        mlflow.set_tags({"robustlab.study": name, "robustlab.optuna_storage": _redact(url)})
        mlflow.log_dict({"mnist_split": "test", "indices": list(test_indices)}, EVALUATED_ARTIFACT)
        client = MlflowClient()
        pairs = [(label, seed) for seed in range(seeds) for label in labels]
        complete = _complete_runs(study)
        for label, seed in [p for p in pairs if p in done]:
            old = done[(label, seed)]
            print(
                f"== experiment: {label} seed {seed}: reusing run {old.info.run_id} ==",
                file=sys.stderr,
                flush=True,
            )
            client.set_tag(old.info.run_id, "robustlab.moved_from_parent", resume_run_id)
            if (label, seed) not in complete:  # a COMPLETE trial, so that a resumed study has it
                _add_adopted(study, label, seed, old, tuple(labels), seeds)
        _adopt_complete(study, parent_id)
        _enqueue_missing(study, pairs)
        if create_only:
            print(
                f"experiment study {name} created (parent run {parent_id}); train its pairs from "
                f"any machine with: robustlab experiment-worker --study-name {name} "
                "[--storage URL], then summarize with the same robustlab experiment command "
                f"plus --study-name {name}",
                file=sys.stderr,
            )
            return parent_id
        t0 = time.perf_counter()
        _drive(study, url, pairs, workers, data_dir, heartbeat, pairs_per_worker)
        mlflow.log_metrics({"experiment/wall_seconds": time.perf_counter() - t0, **_peak_rss_mb()})
        runs = _complete_runs(study)
        _end_lost_runs(study, set(runs.values()))
        child_ids: dict[str, list[str]] = {label: [] for label in labels}
        seconds: dict[str, float] = dict.fromkeys(labels, 0.0)
        for label, seed in pairs:
            info = client.get_run(runs[(label, seed)]).info
            child_ids[label].append(info.run_id)
            seconds[label] += ((info.end_time or info.start_time) - info.start_time) / 1000
        mlflow.log_metrics({f"time/{label}_seconds": s for label, s in seconds.items()})
        _summarize(parent_id, child_ids, seconds, budget, seeds)
        return parent_id


def _peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of the largest worker it started (Linux: KiB)."""
    import resource

    return {
        "experiment/parent_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "experiment/worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        / 1024,
    }


def _existing_study(store, name: str, plan_attr: dict) -> optuna.Study | None:
    """The experiment study `name` when it exists and runs the same plan; ConfigError otherwise."""
    if name not in {s.study_name for s in store.get_all_studies()}:
        return None
    study = optuna.load_study(study_name=name, storage=store)
    if study.user_attrs.get(ATTR_KIND) != KIND:
        raise ConfigError(f"study {name!r} exists and is not an experiment study; choose another")
    old = json.loads(study.user_attrs.get(ATTR_PLAN, "{}"))
    keys = ("budget", "eps", "regimes", "seeds", "test_indices_sha")
    changed = [k for k in keys if old.get(k) != plan_attr[k]]
    if changed:
        was = ", ".join(f"{k}={old.get(k)}" for k in changed)
        raise ConfigError(
            f"experiment study {name!r} exists with {was}; resume it with the same values "
            "or choose another --study-name"
        )
    return study


def _pair_of(trial: optuna.trial.FrozenTrial) -> tuple[str, int] | None:
    label, seed = trial.user_attrs.get(REGIME_ATTR), trial.user_attrs.get(SEED_ATTR)
    return None if label is None or seed is None else (label, int(seed))


def _complete_runs(study: optuna.Study) -> dict[tuple[str, int], str]:
    """(regime, seed) -> the run of its first COMPLETE trial."""
    runs: dict[tuple[str, int], str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        pair = _pair_of(t)
        if pair is not None and RUN_ATTR in t.user_attrs:
            runs.setdefault(pair, t.user_attrs[RUN_ATTR])
    return runs


def _add_adopted(
    study: optuna.Study, label: str, seed: int, run: Run, regimes: tuple[str, ...], seeds: int
) -> None:
    """A FINISHED child of the resumed experiment, as a COMPLETE trial of this study."""
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=[((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000],
            params={"regime": label, "seed": seed},
            distributions=pair_distributions(regimes, seeds),
            user_attrs={
                REGIME_ATTR: label,
                SEED_ATTR: seed,
                RUN_ATTR: run.info.run_id,
                "adopted_from": run.data.tags.get("mlflow.parentRunId", ""),
            },
        )
    )


def _adopt_complete(study: optuna.Study, parent_id: str) -> None:
    """The runs of the study's COMPLETE pairs move under the (new) parent run."""
    client = MlflowClient()
    for run_id in _complete_runs(study).values():
        client.set_tag(run_id, "mlflow.parentRunId", parent_id)


def _enqueue_missing(study: optuna.Study, pairs: list[tuple[str, int]]) -> None:
    """One WAITING trial per pair that has no COMPLETE, WAITING or RUNNING trial yet."""
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    present = {_pair_of(t) for t in study.get_trials(deepcopy=False, states=live)}
    for label, seed in pairs:
        if (label, seed) not in present:
            study.enqueue_trial(
                {"regime": label, "seed": seed}, user_attrs={REGIME_ATTR: label, SEED_ATTR: seed}
            )


def _pending(study: optuna.Study, pairs: list) -> tuple[list, int, int]:
    """Pairs without a COMPLETE trial; WAITING and RUNNING trial counts."""
    trials = study.get_trials(deepcopy=False)
    complete = {_pair_of(t) for t in trials if t.state == TrialState.COMPLETE}
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return [p for p in pairs if p not in complete], waiting, running


def _drive(
    study: optuna.Study,
    url: str,
    pairs: list,
    workers: int,
    data_dir: str | None,
    heartbeat: TuneConfig,
    pairs_per_worker: int = 1,
) -> None:
    """Keep up to `workers` worker processes (each exits after `pairs_per_worker` pairs) busy
    until every pair is COMPLETE.

    Trials RUNNING elsewhere (workers on other machines) are waited for; a dead worker's trial
    comes back WAITING once its heartbeat is stale (`fail_stale_trials`)."""
    from optuna.storages import fail_stale_trials

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    cmd = [sys.executable, "-m", "robustlab.cli", "experiment-worker", "--study-name"]
    cmd += [study.study_name, "--storage", url, "--max-trials", str(pairs_per_worker)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    procs: list[subprocess.Popen] = []
    failures = 0
    try:
        while True:
            for p in [p for p in procs if p.poll() is not None]:
                procs.remove(p)
                failures += p.returncode != 0
            fail_stale_trials(study)
            missing, waiting, running = _pending(study, pairs)
            if not missing and not procs:
                return
            if failures > 2 * len(pairs):
                raise RobustlabError(
                    f"experiment workers failed {failures} times (see their output above); "
                    f"fix the cause and resume with --study-name {study.study_name}"
                )
            if not waiting and not running and not procs:
                raise RobustlabError(
                    f"{len(missing)} regime × seed pair(s) failed: {missing[:4]} (see the worker "
                    f"output above); resume with --study-name {study.study_name} to retry them"
                )
            for _ in range(min(waiting, workers - len(procs))):
                procs.append(subprocess.Popen(cmd, env=env))
            time.sleep(1.0 if procs else min(5.0, heartbeat.heartbeat_interval))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def _end_lost_runs(study: optuna.Study, keep: set[str]) -> None:
    """Runs of FAILED trials (a worker that died, an error) still RUNNING: end them FAILED."""
    client = MlflowClient()
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get(RUN_ATTR)
        if not run_id or run_id in keep:
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "robustlab.experiment.worker_lost", "true")
                client.set_terminated(run_id, "FAILED")
        except MlflowException:
            continue


assert tuple(BUDGETS) == _cli.BUDGETS


def shared_test_indices(
    label_sources: set[str], eval_size: int, data_dir: str | None
) -> tuple[int, ...]:
    """The MNIST test images every regime × seed of one experiment is evaluated on.

    The test set minus the union of the sources every run excludes (the invariance pools of
    every label source the experiment trains with, training and validation), then a subset of
    `eval_size` (0 = all) seeded by TEST_SUBSET_SEED: one set, whatever the regime and seed.
    """
    raw = load_raw_mnist(data_dir)  # the indices need no pixels: skip the float32 copy
    n_test = raw.y_test.shape[0]
    test = Split(np.empty((n_test, 0), np.uint8), raw.y_test, "test", np.arange(n_test))
    del raw
    excluded = np.unique(
        np.concatenate(
            [
                excluded_test_indices(load_inv_pools(data_dir, source).used_sets)
                for source in sorted(label_sources)
            ]
            or [np.empty(0, np.int64)]
        )
    )
    test = subsample(test.without_sources(excluded), eval_size, seed=TEST_SUBSET_SEED)
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
