"""Robustness evaluation: clean, PGD-40, PGD-{steps} x R, AutoAttack, Square, eps-curve, as stages.

`evaluate_and_log` validates its inputs, builds an ordered list of stages from the EvalConfig
(`build_stages`), runs them with `robustlab.evaluation.stages.run_stages` (each stage attacks
only the survivors of the stages before it on the same subset) and turns the stage flags into
metrics, plots and evaluation.json (which lists every stage's cost).

Chains (each is the exact per-example worst case over its stages):
- subset "all" (every test image): PGD-40, then R restarts of PGD-{steps} on what is left, so
  `test/pgd100x{R}_acc` is the worst case over PGD-40 and the R restarts;
- subset "autoattack" (seeded subset of `cfg.autoattack_size`): ART's AutoAttack (APGD-CE,
  APGD-DLR, Square) on the images the PGD chain left standing there, so `test/autoattack_acc`
  is the worst case over PGD and AutoAttack (a non-robust model leaves it nothing to do); a
  stand-alone Square on the same PGD survivors, independent of AutoAttack (`test/square_acc`:
  worst case over PGD and Square; the gradient-free masking check: far below PGD), unless
  `cfg.square_alone` is False (end of training: AutoAttack's own Square is the check);
- subset "curve" (seeded subset of `curve_size`): PGD-40 at ascending eps, each point attacking
  only the survivors of the previous point (an adversarial within eps_i lies within eps_{i+1}),
  so the curve is the worst case over the smaller eps and cannot rise with eps.

The in-graph PGD (`pgd_engine="robustlab"`) exits early: an example is frozen at the first
iterate the model misclassifies and a batch stops once all are broken. Cost therefore grows with
the robust examples only: a non-robust model costs a few steps per image.

Which stages run, their seeds, metrics and report lines come from the attack registry
(`robustlab.attacks.registry`). The work is split in three: `compute` (the stages, one
`Evaluation` with every per-example flag), `write_report` (evaluation.json / .md /
per_example.csv and plots in a folder) and `log_evaluation` (to the active MLflow run);
`evaluate_and_log` does all three.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.attacks.checks import check_logits
from robustlab.attacks.registry import (
    STAGES,
    StageSpec,
    build_stages,
    check_eval_config,
    stage_entry,
)
from robustlab.attacks.stage import pgd_stage
from robustlab.config import EvalConfig
from robustlab.data.mnist import Split
from robustlab.data.validate import check_images, check_labels
from robustlab.errors import DataError
from robustlab.evaluation.indices import (
    PER_EXAMPLE_ARTIFACT,
    indices_digest,
    log_evaluated_indices,
)
from robustlab.evaluation.plots import image_grid, line_plot
from robustlab.evaluation.stages import StageResult, run_stages, worst_case
from robustlab.evaluation.stats import Accuracy, accuracy, predict_logits

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
MASKING_TAG = "robustlab.warning.gradient_masking"
MASKING_MARGIN = 0.05  # AutoAttack / Square this far below PGD (same examples) => warning
CURVE_RISE_TOL = 0.02  # robust accuracy may wobble this much upwards with eps (sampling noise)
SQUARE_QUERIES = 5000  # queries of Square, inside AutoAttack and stand-alone
GRID_COLUMNS = 10
CURVE_METRIC = "test/pgd_curve_acc"  # logged with step = eps in hundredths
# (stage name, its figures with their intervals, MLflow step): called as each stage ends
StageHook = Callable[[str, dict[str, float], int], None]


def check_eval_inputs(test: Split) -> None:
    """Refuse evaluation data that is not float32 (N, 28, 28, 1) in [0, 1] with labels 0..9."""
    x = test.x
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[-1] != 1:
        raise DataError(
            "evaluation images must be a float32 array of shape (N, 28, 28, 1), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        )
    check_images(x, scale="unit", what="evaluation images")
    check_labels(np.asarray(test.y), n=len(x), what="evaluation labels")
    if np.asarray(test.source_index).shape != (len(x),):
        raise DataError("evaluation split: one source index per image is required")


def _progress(stage: str, seconds: float, peak_mb: float | None = None) -> None:
    peak = f", peak RSS {peak_mb:.0f} MiB" if peak_mb is not None else ""
    print(f"[evaluate] {stage} done ({seconds:.0f} s{peak})", file=sys.stderr, flush=True)


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return predict_logits(model, x, batch_size).argmax(axis=1)


def _subset_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Indices of `robustlab.data.mnist.subsample(split, size, seed=seed)` in a split of `n`."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def eps_grid_for(cfg: EvalConfig) -> tuple[float, ...]:
    """The eps-curve points: EPS_GRID, or `cfg.curve_points` evenly spaced from 0 to its end."""
    if cfg.curve_points == len(EPS_GRID):
        return EPS_GRID
    return tuple(round(float(e), 4) for e in np.linspace(0.0, EPS_GRID[-1], cfg.curve_points))


def pgd_restarts(
    model,
    classifier,
    x: np.ndarray,
    y: np.ndarray,
    robust: np.ndarray,
    *,
    restarts: int,
    eps: float,
    steps: int,
    batch_size: int,
    engine: str = "art",
    seed: int = 0,
    x_adv: np.ndarray | None = None,
) -> list[np.ndarray]:
    """`restarts` independent random restarts of PGD-`steps` (step 2.5 eps / steps), chained.

    Restart r attacks the examples still flagged robust after restarts 0..r-1, from a random
    start of its own (`attack_seed(seed, "pgd100", r)`). Returns the robust flags after each
    restart; the last is the per-example worst case over `robust` and every restart.
    """
    stages = [
        pgd_stage(f"restart{r}", eps, steps, engine, "pgd100", seed_index=r)
        for r in range(restarts)
    ]
    results = run_stages(
        model,
        x,
        y,
        robust,
        {"all": np.arange(len(x))},
        stages,
        seed=seed,
        batch_size=batch_size,
        adv_out=x_adv,
        classifier=classifier,
    )
    return [r.robust for r in results]


def gradient_masking_warnings(
    checks: Sequence[tuple[str, float, float]],
    curve_eps: Sequence[float],
    curve_acc: Sequence[float],
    *,
    margin: float = MASKING_MARGIN,
    rise_tol: float = CURVE_RISE_TOL,
) -> list[str]:
    """Signs of gradient masking. `checks`: (attack label, its accuracy, PGD's accuracy on the
    same examples) of every stage whose registry entry has `masking_check` (`masking_checks`).

    - such an attack (AutoAttack, gradient-free Square, ...) more than `margin` below PGD:
      PGD's gradients were misleading.
    - robust accuracy rising with eps by more than `rise_tol`: the attack is not finding the
      optimum (a larger ball contains the smaller one).
    """
    out: list[str] = []
    for name, acc, pgd_acc in checks:
        if not math.isnan(acc) and acc < pgd_acc - margin:
            out.append(
                f"{name} accuracy {acc:.3f} is more than {margin:.2f} below PGD's {pgd_acc:.3f}"
            )
    pairs = [(e, a) for e, a in zip(curve_eps, curve_acc, strict=True) if not math.isnan(a)]
    for (e0, a0), (e1, a1) in zip(pairs, pairs[1:], strict=False):
        if a1 > a0 + rise_tol:
            out.append(f"robust accuracy rises with eps: {a0:.3f} at {e0:g} -> {a1:.3f} at {e1:g}")
    return out


@dataclass
class Evaluation:
    """What `compute` measured: every stage's per-example flags and the accuracies from them."""

    cfg: EvalConfig
    spec: StageSpec
    test: Split
    clean_pred: np.ndarray
    results: list[StageResult]
    subsets: dict[str, np.ndarray]
    x_adv: np.ndarray  # the adversarial that broke each example in a chained "all" stage
    seconds: dict[str, float]
    accs: dict[str, Accuracy] = field(default_factory=dict)
    curve_accs: list[Accuracy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def clean_ok(self) -> np.ndarray:
        return self.clean_pred == self.test.y

    def metrics(self) -> dict[str, float]:
        """Every accuracy with its 95% interval, `test/n_eval` and `test/eval_seconds`."""
        out: dict[str, float] = {}
        for name, acc in self.accs.items():
            out.update(acc.as_metrics(name))
        out["test/n_eval"] = float(len(self.test))
        out["test/n_pgd"] = float(len(self.subsets["all"]))
        out["test/eval_seconds"] = self.seconds["total"]
        return out

    def per_example(self) -> list[dict[str, Any]]:
        """One row per test image: its source index, label, clean prediction and, per stage with
        a metric, 1 robust / 0 broken / empty when the stage did not attack it (another subset)."""
        columns: dict[str, np.ndarray] = {}
        for r in self.results:
            metric = stage_entry(r.stage).metric(self.cfg)
            if metric is None:
                continue
            flags = np.full(len(self.test), -1, dtype=np.int8)
            flags[self.subsets[r.stage.subset]] = r.robust
            columns[metric.removeprefix("test/").removesuffix("_acc")] = flags
        rows = []
        for i in range(len(self.test)):
            row: dict[str, Any] = {
                "source_index": int(self.test.source_index[i]),
                "label": int(self.test.y[i]),
                "clean_pred": int(self.clean_pred[i]),
                "clean": int(self.clean_ok[i]),
            }
            row.update({k: ("" if v[i] < 0 else int(v[i])) for k, v in columns.items()})
            rows.append(row)
        return rows


def compute(
    model,
    test: Split,
    cfg: EvalConfig,
    *,
    eps_grid: Sequence[float] | None = None,
    curve_size: int | None = None,
    square_queries: int | None = None,
    autoattack_steps: int = 100,
    on_stage: StageHook | None = None,
) -> Evaluation:
    """Run the registry's stages for `cfg` on `test` (already stripped of excluded sources and
    subsampled by the caller) and turn their flags into accuracies and masking warnings.
    `on_stage` gets each stage's figures as it ends (clean accuracy first; see `stage_figures`)."""
    check_eval_config(cfg.validate())
    check_eval_inputs(test)
    check_logits(model, test.x)
    spec = StageSpec(
        eps_grid=eps_grid_for(cfg) if eps_grid is None else tuple(float(e) for e in eps_grid),
        square_queries=cfg.square_queries if square_queries is None else square_queries,
        autoattack_steps=autoattack_steps,
    )
    curve_size = cfg.curve_size if curve_size is None else curve_size
    n, bs = len(test), int(cfg.batch_size)
    subset_seed = cfg.seed if cfg.subset_seed is None else cfg.subset_seed
    chain = _subset_indices(n, cfg.pgd_size, subset_seed)  # the PGD chain's images ("all")
    m = len(chain)
    subsets = {
        "all": chain,
        "autoattack": chain[_subset_indices(m, min(cfg.autoattack_size, m), subset_seed)]
        if cfg.autoattack_size > 0
        else np.arange(0),
        "curve": chain[_subset_indices(m, curve_size, subset_seed)],
    }
    t_start = time.perf_counter()
    clean_pred = _predict(model, test.x, bs)
    seconds: dict[str, float] = {"clean": time.perf_counter() - t_start}
    _progress("clean", seconds["clean"])
    clean_ok = clean_pred == test.y
    if on_stage is not None:
        on_stage("clean", accuracy(clean_ok).as_metrics("test/clean_acc"), 0)
    done: list[StageResult] = []

    def progress(r: StageResult) -> None:
        _progress(r.stage.name, r.seconds, r.peak_rss_mb)
        done.append(r)
        if on_stage is not None:
            figures, step = stage_figures(r, cfg, clean_ok, subsets, done)
            on_stage(r.stage.name, figures, step)

    x_adv = test.x.copy()
    results = run_stages(
        model,
        test.x,
        test.y,
        clean_ok,
        subsets,
        build_stages(cfg, spec),
        seed=cfg.seed,
        batch_size=bs,
        early_exit=cfg.early_exit,
        adv_out=x_adv,
        progress=progress,
    )
    for r in results:  # the curve's points add up to one part, as before
        key = "curve" if r.stage.subset == "curve" else r.stage.name
        seconds[key] = seconds.get(key, 0.0) + r.seconds
    ev = Evaluation(cfg, spec, test, clean_pred, results, subsets, x_adv, seconds)
    _accuracies(ev)
    seconds["total"] = time.perf_counter() - t_start
    return ev


def stage_figures(
    r: StageResult,
    cfg: EvalConfig,
    clean_ok: np.ndarray,
    subsets: dict[str, np.ndarray],
    done: Sequence[StageResult],
) -> tuple[dict[str, float], int]:
    """The figures a finished stage `r` settles, named and computed as the final metrics are
    (`_accuracies`), each with its interval, and their MLflow step: its registry metric (the
    worst case over its chain so far), `test/pgd_subset_acc` beside AutoAttack, or one point
    of the eps-curve (`CURVE_METRIC` at step eps in hundredths); `done` holds the stages
    finished so far, `r` last."""
    if r.stage.subset == "curve":
        acc = accuracy(r.robust)
        return {CURVE_METRIC: acc.value}, int(round(float(r.stage.eps) * 100))
    entry = stage_entry(r.stage)
    metric = entry.metric(cfg)
    sub = subsets["autoattack"]
    if metric is None or (r.stage.subset == "autoattack" and len(sub) == 0):
        return {}, 0
    out = accuracy(r.robust).as_metrics(metric)
    if "test/pgd_subset_acc" in entry.extra_metrics:
        chain = subsets["all"]
        pgd_ok = np.zeros(len(clean_ok), bool)
        pgd_ok[chain] = worst_case(done, "all", clean_ok[chain])
        out.update(accuracy(pgd_ok[sub]).as_metrics("test/pgd_subset_acc"))
    return out, 0


def log_stage(name: str, figures: dict[str, float], step: int) -> None:
    """A `StageHook` that logs a stage's figures to the active MLflow run as it ends (NaN, an
    empty subset, is left to the final logging)."""
    import mlflow

    finite = {k: v for k, v in figures.items() if not math.isnan(v)}
    if finite:
        mlflow.log_metrics(finite, step=step)


def _accuracies(ev: Evaluation) -> None:
    """The metric of every stage entry that ran (registry order), the curve, masking warnings."""
    ev.accs["test/clean_acc"] = accuracy(ev.clean_ok)
    pgd_ok = pgd_flags(ev)
    sub = ev.subsets["autoattack"]
    for r in ev.results:
        entry = stage_entry(r.stage)
        metric = entry.metric(ev.cfg)
        if metric is None or (r.stage.subset == "autoattack" and len(sub) == 0):
            continue
        ev.accs[metric] = accuracy(r.robust)
        if "test/pgd_subset_acc" in entry.extra_metrics:
            ev.accs["test/pgd_subset_acc"] = accuracy(pgd_ok[sub])
    ev.curve_accs = [accuracy(r.robust) for r in ev.results if r.stage.subset == "curve"]
    ev.warnings = gradient_masking_warnings(
        masking_checks(ev), list(ev.spec.eps_grid), [a.value for a in ev.curve_accs]
    )


def pgd_flags(ev: Evaluation) -> np.ndarray:
    """Per test image: robust after the strongest PGD chain (False off the chain's images)."""
    chain = ev.subsets["all"]
    pgd_ok = np.zeros(len(ev.test), bool)
    pgd_ok[chain] = worst_case(ev.results, "all", ev.clean_ok[chain])
    return pgd_ok


def masking_checks(ev: Evaluation) -> list[tuple[str, float, float]]:
    """(label, accuracy, PGD's accuracy on the same examples) of every stage that ran whose
    registry entry has `masking_check`."""
    pgd_ok = pgd_flags(ev)
    out = []
    for r in ev.results:
        entry = stage_entry(r.stage)
        idx = ev.subsets[r.stage.subset]
        if entry.masking_check and len(idx):
            out.append((entry.label(ev.cfg), accuracy(r.robust).value, accuracy(pgd_ok[idx]).value))
    return out


def _md_summary(ev: Evaluation, info: dict[str, Any]) -> str:
    on_subset = list(
        dict.fromkeys(
            stage_entry(r.stage).label(ev.cfg) for r in ev.results if r.stage.subset == "autoattack"
        )
    )
    art = f"{', '.join(on_subset)} from ART; " if on_subset else ""
    lines = [
        f"# Robustness evaluation (L-inf, eps = {info['eps']:g})",
        "",
        f"{info['n_eval']} test images (PGD on {info['n_pgd']}); "
        f"{'/'.join(on_subset) or 'AutoAttack'} on {info['n_autoattack']}, "
        f"eps-curve on {info['n_curve']}; PGD from {info['attacks']['pgd40']['library']}, "
        f"{art}95% Wilson intervals.",
        "",
        "| metric | accuracy | 95% interval | n |",
        "|---|---|---|---|",
    ]
    for name, acc in ev.accs.items():
        lines.append(
            f"| `{name}` | {acc.value:.4f} | [{acc.ci_low:.4f}, {acc.ci_high:.4f}] | {acc.n} |"
        )
    lines += ["", "| eps | PGD-40 accuracy |", "|---|---|"]
    for e, a in zip(info["curve"]["eps"], info["curve"]["acc"], strict=True):
        lines.append(f"| {e:g} | {a:.4f} |")
    lines.append("")
    if info["warnings"]:
        lines.append("**Gradient-masking warning:** " + "; ".join(info["warnings"]))
    else:
        lines.append("No sign of gradient masking.")
    lines += ["", f"Evaluation took {info['seconds']['total']:.0f} s."]
    return "\n".join(lines) + "\n"


def _info(ev: Evaluation) -> dict[str, Any]:
    """evaluation.json's content."""
    cfg, n_aa, n_curve = ev.cfg, len(ev.subsets["autoattack"]), len(ev.subsets["curve"])
    attacks: dict[str, Any] = {}
    for r in ev.results:
        entry = stage_entry(r.stage)
        if entry.name != "curve":
            attacks[r.stage.name] = entry.describe(cfg, ev.spec, n_aa)
    if "autoattack" not in attacks:  # the strong attack's settings, also when skipped
        attacks["autoattack"] = STAGES["autoattack"].describe(cfg, ev.spec, n_aa)
    return {
        "eps": float(cfg.eps),
        "pgd_engine": cfg.pgd_engine,
        "early_exit": cfg.early_exit,
        "norm": "inf",
        "seed": cfg.seed,
        "subset_seed": cfg.seed if cfg.subset_seed is None else cfg.subset_seed,
        "n_eval": len(ev.test),
        "n_pgd": len(ev.subsets["all"]),
        "n_autoattack": n_aa,
        "n_curve": n_curve,
        "pgd_restarts": int(cfg.pgd_restarts),
        "pgd_steps": cfg.pgd_steps,
        "extra_attacks": list(cfg.extra_attacks),
        "attacks": attacks,
        "metrics": ev.metrics(),
        "accuracies": {
            name: {"value": a.value, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
            for name, a in ev.accs.items()
        },
        "curve": {
            "attack": "PGD-40, one random start, step 2.5 eps / 40, each eps on the survivors "
            "of the smaller ones"
            if cfg.early_exit
            else "PGD-40, one random start, step 2.5 eps / 40",
            "eps": [float(e) for e in ev.spec.eps_grid],
            "acc": [a.value for a in ev.curve_accs],
            "ci_low": [a.ci_low for a in ev.curve_accs],
            "ci_high": [a.ci_high for a in ev.curve_accs],
            "n": n_curve,
        },
        "gradient_masking": bool(ev.warnings),
        "warnings": ev.warnings,
        "stages": [r.record() for r in ev.results],
        "seconds": ev.seconds,
        "excluded_sources_removed_by_caller": True,
        "source_indices_sha": indices_digest(ev.test.source_index),
    }


def write_report(ev: Evaluation, out_dir: Path, model=None) -> list[Path]:
    """Write evaluation.json, evaluation.md, per_example.csv, eps_curve.png and (with `model`)
    adversarial_examples.png to `out_dir`; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = _info(ev)
    paths = [out_dir / "evaluation.json", out_dir / "evaluation.md", out_dir / PER_EXAMPLE_ARTIFACT]
    paths[0].write_text(json.dumps(_finite(info), indent=2, default=_json_default, allow_nan=False))
    paths[1].write_text(_md_summary(ev, info))
    rows = ev.per_example()
    with open(paths[2], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["source_index"])
        writer.writeheader()
        writer.writerows(rows)
    eps_grid = [float(e) for e in ev.spec.eps_grid]
    paths.append(
        line_plot(
            {"PGD-40": (eps_grid, [a.value for a in ev.curve_accs])},
            out_dir / "eps_curve.png",
            xlabel="L-inf eps",
            ylabel="robust accuracy",
            title=f"Accuracy vs eps (PGD-40, n={len(ev.subsets['curve'])})",
            bands={
                "PGD-40": ([a.ci_low for a in ev.curve_accs], [a.ci_high for a in ev.curve_accs])
            },
        )
    )
    cols = min(GRID_COLUMNS, len(ev.test))
    if model is not None and cols > 0:
        x, y, eps = ev.test.x, ev.test.y, float(ev.cfg.eps)
        paths.append(
            image_grid(
                [("clean", x[:cols]), (f"adv eps={eps:g}", ev.x_adv[:cols])],
                y[:cols],
                [ev.clean_pred[:cols], _predict(model, ev.x_adv[:cols], ev.cfg.batch_size)],
                out_dir / "adversarial_examples.png",
                title=f"Clean vs worst PGD adversarial (label→prediction), eps={eps:g}",
            )
        )
    return paths


def log_evaluation(
    ev: Evaluation, paths: Sequence[Path], logged: frozenset[str] = frozenset()
) -> None:
    """Log the metrics, the accuracy-vs-eps points, the evaluated test indices, the artifacts
    and (when suspected) the gradient-masking tag to the active MLflow run; the metrics named in
    `logged` were logged already (stage by stage: `log_stage`) and are not logged again."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in ev.metrics().items() if k not in logged})
    log_evaluated_indices(ev.test)
    for e, a in zip(ev.spec.eps_grid, ev.curve_accs, strict=True):
        if not math.isnan(a.value) and CURVE_METRIC not in logged:
            mlflow.log_metric(CURVE_METRIC, a.value, step=int(round(float(e) * 100)))
    for path in paths:
        if Path(path).is_file():
            mlflow.log_artifact(str(path))
    if ev.warnings:
        mlflow.set_tag(MASKING_TAG, "; ".join(ev.warnings)[:5000])


def evaluate_and_log(
    model,
    test: Split,
    cfg: EvalConfig,
    *,
    out_dir: Path,
    log: bool = True,
    eps_grid: Sequence[float] | None = None,
    curve_size: int | None = None,
    square_queries: int | None = None,
    autoattack_steps: int = 100,
    on_stage: StageHook | None = None,
) -> dict[str, float]:
    """Evaluate `model` (logits) on `test` through the registry's stages and log it (`compute`,
    `report`, `log`); the metrics. With `log`, each stage's figures are logged as the stage
    ends (`log_stage`), so an evaluation stopped midway keeps every finished stage's number;
    `on_stage` is called after that.

    `test` is already stripped of excluded sources and subsampled by the caller. Metrics (each
    with `_ci_low`/`_ci_high`, 95% Wilson): `test/clean_acc`, `test/pgd40_acc` (PGD-40, one
    random start, step 2.5 eps / 40), `test/pgd{S}x{R}_acc` (S = `cfg.pgd_steps`, usually
    `pgd100x{R}`: worst case over PGD-40 and R restarts of PGD-S; not logged when R = 0),
    `test/autoattack_acc`, `test/square_acc` and `test/pgd_subset_acc` (the PGD worst case on
    that same subset, for comparison) when `cfg.autoattack_size` > 0 (0 skips them), the
    metric of every optional stage `cfg.extra_attacks` names, `test/pgd_curve_acc` logged with
    step = eps in hundredths, `test/n_eval`, `test/eval_seconds`. Artifacts in `out_dir` (and
    in the active MLflow run when `log`): evaluation.json (with `stages`: every stage's cost),
    evaluation.md, per_example.csv, eps_curve.png, adversarial_examples.png. A gradient-masking
    suspicion sets the run tag `robustlab.warning.gradient_masking`. Seeded by `cfg.seed`
    (subsets by `cfg.subset_seed` when set). `eps_grid`, `curve_size`, `square_queries` and
    `autoattack_steps` (APGD iterations) exist to keep tests fast; leave the defaults for
    reported numbers.
    """
    logged: set[str] = set()

    def each_stage(name: str, figures: dict[str, float], step: int) -> None:
        if log:
            log_stage(name, figures, step)
            logged.update(k for k, v in figures.items() if not math.isnan(v))
        if on_stage is not None:
            on_stage(name, figures, step)

    ev = compute(
        model,
        test,
        cfg,
        eps_grid=eps_grid,
        curve_size=curve_size,
        square_queries=square_queries,
        autoattack_steps=autoattack_steps,
        on_stage=each_stage if log or on_stage is not None else None,
    )
    paths = write_report(ev, out_dir, model)
    if log:
        log_evaluation(ev, paths, frozenset(logged))
    return ev.metrics()


def _finite(obj: Any) -> Any:
    """NaN (empty evaluations) -> null, so evaluation.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and math.isnan(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
