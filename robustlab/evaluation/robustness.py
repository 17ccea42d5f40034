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
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.attacks.checks import check_logits
from robustlab.config import EvalConfig
from robustlab.data.mnist import Split
from robustlab.data.validate import check_images, check_labels
from robustlab.errors import DataError
from robustlab.evaluation.indices import log_evaluated_indices
from robustlab.evaluation.plots import image_grid, line_plot
from robustlab.evaluation.stages import (
    Stage,
    StageResult,
    attack_seed,
    pgd_step,
    run_stages,
)
from robustlab.evaluation.stats import Accuracy, accuracy, predict_logits

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
MASKING_TAG = "robustlab.warning.gradient_masking"
MASKING_MARGIN = 0.05  # AutoAttack / Square this far below PGD (same examples) => warning
CURVE_RISE_TOL = 0.02  # robust accuracy may wobble this much upwards with eps (sampling noise)
SQUARE_QUERIES = 5000  # queries of Square, inside AutoAttack and stand-alone
GRID_COLUMNS = 10


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


def restart_stage_name(steps: int, restarts: int) -> str:
    return f"pgd{steps}x{restarts}"


def build_stages(
    cfg: EvalConfig,
    eps_grid: Sequence[float],
    *,
    square_queries: int,
    autoattack_steps: int = 100,
) -> list[Stage]:
    """The evaluation's stages, in order, from `cfg` (see the module docstring)."""
    eps, engine = float(cfg.eps), cfg.pgd_engine
    stages = [Stage("pgd40", "pgd", eps, steps=40, engine=engine, seed_stream="pgd40")]
    if cfg.pgd_restarts > 0:
        stages.append(
            Stage(
                restart_stage_name(cfg.pgd_steps, cfg.pgd_restarts),
                "pgd",
                eps,
                steps=cfg.pgd_steps,
                restarts=cfg.pgd_restarts,
                engine=engine,
                seed_stream="pgd100",
            )
        )
    if cfg.autoattack_size > 0:
        stages.append(
            Stage(
                "autoattack",
                "autoattack",
                eps,
                steps=autoattack_steps,
                subset="autoattack",
                engine="art",
                seed_stream="autoattack",
                square_queries=square_queries,
                after_all=cfg.early_exit,  # the old cost: AutoAttack on every clean-correct image
            )
        )
    if cfg.autoattack_size > 0 and cfg.square_alone:
        stages.append(
            Stage(
                "square",
                "square",
                eps,
                steps=square_queries,
                subset="autoattack",
                engine="art",
                seed_stream="square",
                independent=True,
                after_all=cfg.early_exit,
            )
        )
    for i, e in enumerate(eps_grid):
        stages.append(
            Stage(
                f"curve@{float(e):g}",
                "pgd",
                float(e),
                steps=40,
                subset="curve",
                engine=engine,
                seed_stream="curve",
                seed_index=i,
                independent=not cfg.early_exit,  # the old cost: every point attacks every image
            )
        )
    return stages


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
        Stage(
            f"restart{r}",
            "pgd",
            eps,
            steps=steps,
            engine=engine,
            seed_stream="pgd100",
            seed_index=r,
        )
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
    pgd_acc: float,
    autoattack_acc: float | None,
    square_acc: float | None,
    curve_eps: Sequence[float],
    curve_acc: Sequence[float],
    *,
    margin: float = MASKING_MARGIN,
    rise_tol: float = CURVE_RISE_TOL,
) -> list[str]:
    """Signs of gradient masking; `pgd_acc` must be measured on the same examples as AA/Square.

    - AutoAttack more than `margin` below PGD: PGD's gradients were misleading.
    - Square (gradient-free) more than `margin` below PGD: same, and a strong sign.
    - robust accuracy rising with eps by more than `rise_tol`: the attack is not finding the
      optimum (a larger ball contains the smaller one).
    """
    out: list[str] = []
    for name, acc in (("AutoAttack", autoattack_acc), ("Square", square_acc)):
        if acc is not None and not math.isnan(acc) and acc < pgd_acc - margin:
            out.append(
                f"{name} accuracy {acc:.3f} is more than {margin:.2f} below PGD's {pgd_acc:.3f}"
            )
    pairs = [(e, a) for e, a in zip(curve_eps, curve_acc, strict=True) if not math.isnan(a)]
    for (e0, a0), (e1, a1) in zip(pairs, pairs[1:], strict=False):
        if a1 > a0 + rise_tol:
            out.append(f"robust accuracy rises with eps: {a0:.3f} at {e0:g} -> {a1:.3f} at {e1:g}")
    return out


def _md_summary(metrics: dict[str, float], accs: dict[str, Accuracy], info: dict[str, Any]) -> str:
    lines = [
        f"# Robustness evaluation (L-inf, eps = {info['eps']:g})",
        "",
        f"{info['n_eval']} test images; AutoAttack/Square on {info['n_autoattack']}, "
        f"eps-curve on {info['n_curve']}; PGD from {info['attacks']['pgd40']['library']}, "
        "AutoAttack and Square from ART; 95% Wilson intervals.",
        "",
        "| metric | accuracy | 95% interval | n |",
        "|---|---|---|---|",
    ]
    for name, acc in accs.items():
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
) -> dict[str, float]:
    """Evaluate `model` (logits) on `test` through the stages of `build_stages(cfg)` and log it.

    `test` is already stripped of excluded sources and subsampled by the caller. Metrics (each
    with `_ci_low`/`_ci_high`, 95% Wilson): `test/clean_acc`, `test/pgd40_acc` (PGD-40, one
    random start, step 2.5 eps / 40), `test/pgd{S}x{R}_acc` (S = `cfg.pgd_steps`, usually
    `pgd100x{R}`: worst case over PGD-40 and R restarts of PGD-S; not logged when R = 0),
    `test/autoattack_acc`, `test/square_acc` and `test/pgd_subset_acc` (the PGD worst case on
    that same subset, for comparison) when `cfg.autoattack_size` > 0 (0 skips them),
    `test/pgd_curve_acc` logged with step = eps in hundredths, `test/n_eval`,
    `test/eval_seconds`. Artifacts in `out_dir` (and in the active MLflow run when `log`):
    evaluation.json (with `stages`: every stage's cost), evaluation.md, eps_curve.png,
    adversarial_examples.png. A gradient-masking suspicion sets the run tag
    `robustlab.warning.gradient_masking`. Seeded by `cfg.seed`. `eps_grid`, `curve_size`,
    `square_queries` and `autoattack_steps` (APGD iterations) exist to keep tests fast; leave
    the defaults for reported numbers.
    """
    cfg.validate()
    check_eval_inputs(test)
    check_logits(model, test.x)
    square_queries = cfg.square_queries if square_queries is None else square_queries
    curve_size = cfg.curve_size if curve_size is None else curve_size
    eps_grid = eps_grid_for(cfg) if eps_grid is None else tuple(float(e) for e in eps_grid)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eps, bs, R = float(cfg.eps), int(cfg.batch_size), int(cfg.pgd_restarts)
    x, y, n = test.x, test.y, len(test)
    stages = build_stages(
        cfg, eps_grid, square_queries=square_queries, autoattack_steps=autoattack_steps
    )
    subsets = {
        "all": np.arange(n),
        "autoattack": _subset_indices(n, min(cfg.autoattack_size, n), cfg.seed)
        if cfg.autoattack_size > 0
        else np.arange(0),
        "curve": _subset_indices(n, curve_size, cfg.seed),
    }
    t_start = time.perf_counter()
    clean_pred = _predict(model, x, bs)
    clean_ok = clean_pred == y
    seconds: dict[str, float] = {"clean": time.perf_counter() - t_start}
    _progress("clean", seconds["clean"])

    x_adv = x.copy()
    results = run_stages(
        model,
        x,
        y,
        clean_ok,
        subsets,
        stages,
        seed=cfg.seed,
        batch_size=bs,
        early_exit=cfg.early_exit,
        adv_out=x_adv,
        progress=lambda r: _progress(r.stage.name, r.seconds, r.peak_rss_mb),
    )
    by_name = {r.stage.name: r for r in results}
    for r in results:  # the curve's points add up to one part, as before
        key = "curve" if r.stage.subset == "curve" else r.stage.name
        seconds[key] = seconds.get(key, 0.0) + r.seconds

    pgd40_ok = by_name["pgd40"].robust
    restart_name = restart_stage_name(cfg.pgd_steps, R)
    pgd_ok = by_name[restart_name].robust if R > 0 else pgd40_ok
    accs: dict[str, Accuracy] = {
        "test/clean_acc": accuracy(clean_ok),
        "test/pgd40_acc": accuracy(pgd40_ok),
    }
    if R > 0:  # R = 0: PGD-40 is the strongest PGD; AutoAttack stays the strong attack
        accs[f"test/{restart_name}_acc"] = accuracy(pgd_ok)
    aa_acc = sq_acc = None
    sub_idx = subsets["autoattack"]
    if "autoattack" in by_name and len(sub_idx) > 0:
        accs["test/autoattack_acc"] = accuracy(by_name["autoattack"].robust)
        accs["test/pgd_subset_acc"] = accuracy(pgd_ok[sub_idx])
        aa_acc = accs["test/autoattack_acc"].value
    if "square" in by_name and len(sub_idx) > 0:
        accs["test/square_acc"] = accuracy(by_name["square"].robust)
        sq_acc = accs["test/square_acc"].value
    curve = [r for r in results if r.stage.subset == "curve"]
    curve_accs = [accuracy(r.robust) for r in curve]
    n_curve = len(subsets["curve"])

    pgd_ref = accs["test/pgd_subset_acc"].value if aa_acc is not None else accuracy(pgd_ok).value
    warnings = gradient_masking_warnings(
        pgd_ref, aa_acc, sq_acc, list(eps_grid), [a.value for a in curve_accs]
    )

    metrics: dict[str, float] = {}
    for name, acc in accs.items():
        metrics.update(acc.as_metrics(name))
    metrics["test/n_eval"] = float(n)
    seconds["total"] = time.perf_counter() - t_start
    metrics["test/eval_seconds"] = seconds["total"]

    curve_path = line_plot(
        {"PGD-40": ([float(e) for e in eps_grid], [a.value for a in curve_accs])},
        out_dir / "eps_curve.png",
        xlabel="L-inf eps",
        ylabel="robust accuracy",
        title=f"Accuracy vs eps (PGD-40, n={n_curve})",
        bands={"PGD-40": ([a.ci_low for a in curve_accs], [a.ci_high for a in curve_accs])},
    )
    cols = min(GRID_COLUMNS, n)
    grid_path = out_dir / "adversarial_examples.png"
    if cols > 0:
        image_grid(
            [("clean", x[:cols]), (f"adv eps={eps:g}", x_adv[:cols])],
            y[:cols],
            [clean_pred[:cols], _predict(model, x_adv[:cols], bs)],
            grid_path,
            title=f"Clean vs worst PGD adversarial (label→prediction), eps={eps:g}",
        )

    info = _report(
        cfg,
        test,
        results,
        accs,
        metrics,
        warnings,
        seconds,
        eps_grid=eps_grid,
        curve_accs=curve_accs,
        n_autoattack=len(sub_idx),
        n_curve=n_curve,
        square_queries=square_queries,
        autoattack_steps=autoattack_steps,
    )
    json_path = out_dir / "evaluation.json"
    json_path.write_text(
        json.dumps(_finite(info), indent=2, default=_json_default, allow_nan=False)
    )
    md_path = out_dir / "evaluation.md"
    md_path.write_text(_md_summary(metrics, accs, info))

    if log:
        import mlflow

        mlflow.log_metrics(metrics)
        log_evaluated_indices(test)
        for e, a in zip(eps_grid, curve_accs, strict=True):
            if not math.isnan(a.value):
                mlflow.log_metric("test/pgd_curve_acc", a.value, step=int(round(float(e) * 100)))
        for path in (json_path, md_path, curve_path, grid_path):
            if path.is_file():
                mlflow.log_artifact(str(path))
        if warnings:
            mlflow.set_tag(MASKING_TAG, "; ".join(warnings)[:5000])
    return metrics


def _report(
    cfg: EvalConfig,
    test: Split,
    results: list[StageResult],
    accs: dict[str, Accuracy],
    metrics: dict[str, float],
    warnings: list[str],
    seconds: dict[str, float],
    *,
    eps_grid: Sequence[float],
    curve_accs: list[Accuracy],
    n_autoattack: int,
    n_curve: int,
    square_queries: int,
    autoattack_steps: int,
) -> dict[str, Any]:
    """evaluation.json's content."""
    eps, R = float(cfg.eps), int(cfg.pgd_restarts)
    pgd_library = (
        "ART ProjectedGradientDescent"
        if cfg.pgd_engine == "art"
        else "robustlab.attacks.tf_attacks.pgd_attack (matches ART's PGD, tested; early exit)"
    )
    info: dict[str, Any] = {
        "eps": eps,
        "pgd_engine": cfg.pgd_engine,
        "early_exit": cfg.early_exit,
        "norm": "inf",
        "seed": cfg.seed,
        "n_eval": len(test),
        "n_autoattack": n_autoattack,
        "n_curve": n_curve,
        "pgd_restarts": R,
        "pgd_steps": cfg.pgd_steps,
        "attacks": {
            "pgd40": {
                "library": pgd_library,
                "steps": 40,
                "step_size": pgd_step(eps, 40),
                "random_starts": 1,
            },
            "autoattack": {
                "library": "ART AutoAttack",
                "attacks": ["APGD-CE", "APGD-DLR", "Square"],
                "apgd_steps": autoattack_steps,
                "square_queries": square_queries,
                "size": n_autoattack,
            },
        },
        "metrics": metrics,
        "accuracies": {
            name: {"value": a.value, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
            for name, a in accs.items()
        },
        "curve": {
            "attack": "PGD-40, one random start, step 2.5 eps / 40, each eps on the survivors "
            "of the smaller ones"
            if cfg.early_exit
            else "PGD-40, one random start, step 2.5 eps / 40",
            "eps": [float(e) for e in eps_grid],
            "acc": [a.value for a in curve_accs],
            "ci_low": [a.ci_low for a in curve_accs],
            "ci_high": [a.ci_high for a in curve_accs],
            "n": n_curve,
        },
        "gradient_masking": bool(warnings),
        "warnings": warnings,
        "stages": [r.record() for r in results],
        "seconds": seconds,
        "excluded_sources_removed_by_caller": True,
        "source_indices_sha": _indices_digest(test.source_index),
    }
    if cfg.square_alone:
        info["attacks"]["square"] = {
            "library": "ART SquareAttack",
            "queries": square_queries,
            "size": n_autoattack,
        }
    if R > 0:
        name = restart_stage_name(cfg.pgd_steps, R)
        info["attacks"][name] = {
            "library": pgd_library,
            "steps": cfg.pgd_steps,
            "step_size": pgd_step(eps, cfg.pgd_steps),
            "restarts": R,
            "start_seeds": [attack_seed(cfg.seed, "pgd100", r) for r in range(R)],
            "note": "worst case with PGD-40; each restart attacks the survivors from a new start",
        }
    return info


def _indices_digest(indices: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


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
