"""Robustness evaluation through ART: clean, PGD-40, PGD-100 x R, AutoAttack, Square, eps-curve.

Cost model (why the attacks are chained): an example that is misclassified clean, or broken by a
cheaper attack, is not robust whatever a stronger attack does, so each attack only runs on the
examples still correct after the previous ones. `test/pgd100x{R}_acc` is therefore the
per-example worst case over PGD-40 and R restarts of PGD-100 (each restart attacking only what
the earlier ones left standing). This is exactly the accuracy of "PGD-40 + PGD-100 x R" run on
every example, never higher than PGD-100 x R alone, and it costs time only for robust examples.
On a robust model (about 90% robust at eps 0.3) PGD-100 x R still dominates the cost: about
R x 100 gradient steps per robust image.

AutoAttack (ART `AutoAttack` over APGD-CE, APGD-DLR and Square, see
`robustlab.attacks.art_factory.make_attack`) and a stand-alone Square attack run on a fixed,
seeded subset of `cfg.autoattack_size` examples; the accuracy-vs-eps curve (PGD-40, one random
start) runs on a seeded subset of `curve_size` examples.
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

from robustlab.attacks.art_factory import make_attack, make_classifier
from robustlab.attacks.checks import check_logits
from robustlab.attacks.tf_attacks import pgd_attack
from robustlab.config import EvalConfig
from robustlab.data.mnist import Split, subsample
from robustlab.data.validate import check_images, check_labels
from robustlab.errors import DataError
from robustlab.evaluation.indices import log_evaluated_indices
from robustlab.evaluation.plots import image_grid, line_plot
from robustlab.evaluation.stats import Accuracy, accuracy, predict_logits

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
MASKING_TAG = "robustlab.warning.gradient_masking"
MASKING_MARGIN = 0.05  # AutoAttack / Square this far below PGD (same examples) => warning
CURVE_RISE_TOL = 0.02  # robust accuracy may wobble this much upwards with eps (sampling noise)
SQUARE_QUERIES = 5000  # queries of Square, inside AutoAttack and stand-alone
PGD_STEP_FACTOR = 2.5  # step size = 2.5 * eps / steps (Madry et al.)
GRID_COLUMNS = 10
_STAGES = {"pgd40": 1, "pgd100": 2, "curve": 3, "autoattack": 4, "square": 5}


def attack_seed(seed: int, stage: str, index: int = 0) -> int:
    """A reproducible seed of its own for each attack stage and restart (or eps-curve point).

    Every restart draws its random start from its own seed, so R restarts are R independent
    starts (not one start R times), and a restart does not depend on what ran before it.
    """
    words = [int(seed) % 2**32, _STAGES[stage], int(index)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


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


def _progress(stage: str, seconds: float) -> None:
    print(f"[evaluate] {stage} done ({seconds:.0f} s)", file=sys.stderr, flush=True)


def _pgd_step(eps: float, steps: int) -> float:
    return PGD_STEP_FACTOR * eps / steps if eps > 0 else 0.01


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return predict_logits(model, x, batch_size).argmax(axis=1)


def _attack_survivors(
    model,
    classifier,
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    robust: np.ndarray,
    *,
    eps: float,
    batch_size: int,
    x_adv: np.ndarray | None = None,
    engine: str = "art",
    seed: int = 0,
    **params: Any,
) -> np.ndarray:
    """Run attack `name` on the examples flagged `robust`; returns the updated flags.

    Attacks come from ART, except PGD with `engine="robustlab"`: the in-graph PGD of
    `robustlab.attacks.tf_attacks` (tested to match ART's PGD per example, about 2x faster).
    When `x_adv` is given, the adversarial images that broke an example are written into it.
    `seed` fixes the random start: PGD and Square from ART draw it from numpy's global
    generator, which is seeded with `seed` just before the attack.
    """
    robust = robust.copy()
    idx = np.flatnonzero(robust)
    if len(idx) == 0 or eps == 0:
        return robust
    if name == "pgd" and engine == "robustlab":
        adv = pgd_attack(
            model,
            x[idx],
            y[idx],
            eps=eps,
            steps=params["steps"],
            step_size=params["step_size"],
            restarts=params.get("restarts", 1),
            batch_size=batch_size,
            seed=seed,
        )
    else:
        attack = make_attack(name, classifier, eps=eps, batch_size=batch_size, **params)
        np.random.seed(seed)  # ART's random starts come from numpy's global generator
        adv = attack.generate(x[idx], y[idx]).astype(np.float32)
    broken = _predict(model, adv, batch_size) != y[idx]
    robust[idx[broken]] = False
    if x_adv is not None:
        x_adv[idx[broken]] = adv[broken]
    return robust


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
    history: list[np.ndarray] = []
    for r in range(restarts):
        robust = _attack_survivors(
            model,
            classifier,
            "pgd",
            x,
            y,
            robust,
            eps=eps,
            batch_size=batch_size,
            x_adv=x_adv,
            steps=steps,
            step_size=_pgd_step(eps, steps),
            restarts=1,
            engine=engine,
            seed=attack_seed(seed, "pgd100", r),
        )
        history.append(robust)
    return history


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
    """Evaluate `model` (logits) on `test` with ART attacks and log the results.

    `test` is already stripped of excluded sources and subsampled by the caller. Metrics (each
    with `_ci_low`/`_ci_high`, 95% Wilson): `test/clean_acc`, `test/pgd40_acc` (PGD-40, one
    random start, step 2.5 eps / 40), `test/pgd100x{R}_acc` (worst case over PGD-40 and R
    restarts of PGD-100, not logged when R = 0, see the module docstring), `test/autoattack_acc`, `test/square_acc` and
    `test/pgd_subset_acc` (the PGD-100 x R accuracy on that same subset, for comparison) when
    `cfg.autoattack_size` > 0 (0 skips them), `test/pgd_curve_acc` logged with step = eps in
    hundredths. Artifacts in `out_dir` (and in the active MLflow run when `log`):
    evaluation.json, evaluation.md, eps_curve.png, adversarial_examples.png. A gradient-masking
    suspicion sets the run tag `robustlab.warning.gradient_masking`. Seeded by `cfg.seed`.
    `eps_grid`, `curve_size`, `square_queries` and `autoattack_steps` (APGD iterations) exist to
    keep tests fast; leave the defaults for reported numbers.
    """
    cfg.validate()
    check_eval_inputs(test)
    check_logits(model, test.x)
    square_queries = cfg.square_queries if square_queries is None else square_queries
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eps, bs, R = float(cfg.eps), int(cfg.batch_size), int(cfg.pgd_restarts)
    engine = cfg.pgd_engine
    classifier = make_classifier(model)
    x, y = test.x, test.y
    seconds: dict[str, float] = {}
    t_start = t = time.perf_counter()

    clean_pred = _predict(model, x, bs)
    clean_ok = clean_pred == y
    seconds["clean"] = time.perf_counter() - t
    _progress("clean", seconds["clean"])

    t = time.perf_counter()
    x_adv = x.copy()
    pgd40_ok = _attack_survivors(
        model,
        classifier,
        "pgd",
        x,
        y,
        clean_ok,
        eps=eps,
        batch_size=bs,
        x_adv=x_adv,
        steps=40,
        step_size=_pgd_step(eps, 40),
        restarts=1,
        engine=engine,
        seed=attack_seed(cfg.seed, "pgd40"),
    )
    seconds["pgd40"] = time.perf_counter() - t
    _progress("pgd40", seconds["pgd40"])

    t = time.perf_counter()
    history = pgd_restarts(
        model,
        classifier,
        x,
        y,
        pgd40_ok,
        restarts=R,
        eps=eps,
        steps=100,
        batch_size=bs,
        engine=engine,
        seed=cfg.seed,
        x_adv=x_adv,
    )
    pgd100_ok = history[-1] if history else pgd40_ok
    accs: dict[str, Accuracy] = {
        "test/clean_acc": accuracy(clean_ok),
        "test/pgd40_acc": accuracy(pgd40_ok),
    }
    if R > 0:  # R = 0: PGD-40 is the strongest PGD; AutoAttack stays the strong attack
        seconds[f"pgd100x{R}"] = time.perf_counter() - t
        _progress(f"pgd100x{R}", seconds[f"pgd100x{R}"])
        accs[f"test/pgd100x{R}_acc"] = accuracy(pgd100_ok)

    aa_acc = sq_acc = None
    n_aa = 0
    if cfg.autoattack_size > 0 and len(test) > 0:
        sub_idx = np.sort(
            np.random.default_rng(cfg.seed).choice(
                len(test), size=min(cfg.autoattack_size, len(test)), replace=False
            )
        )
        n_aa = len(sub_idx)
        xs, ys = x[sub_idx], y[sub_idx]
        t = time.perf_counter()
        aa_ok = clean_ok[sub_idx].copy()
        if eps > 0 and aa_ok.any():
            aa = make_attack(
                "autoattack",
                classifier,
                eps=eps,
                batch_size=bs,
                square_queries=square_queries,
                steps=autoattack_steps,
            )
            np.random.seed(attack_seed(cfg.seed, "autoattack"))  # ART's RNG: numpy's global one
            adv = aa.generate(xs, ys).astype(np.float32)
            aa_ok &= _predict(model, adv, bs) == ys
        seconds["autoattack"] = time.perf_counter() - t
        _progress("autoattack", seconds["autoattack"])
        t = time.perf_counter()
        sq_ok = _attack_survivors(
            model,
            classifier,
            "square",
            xs,
            ys,
            clean_ok[sub_idx],
            eps=eps,
            batch_size=bs,
            steps=square_queries,
            restarts=1,
            seed=attack_seed(cfg.seed, "square"),
        )
        seconds["square"] = time.perf_counter() - t
        _progress("square", seconds["square"])
        accs["test/autoattack_acc"] = accuracy(aa_ok)
        accs["test/square_acc"] = accuracy(sq_ok)
        accs["test/pgd_subset_acc"] = accuracy(pgd100_ok[sub_idx])
        aa_acc, sq_acc = accs["test/autoattack_acc"].value, accs["test/square_acc"].value

    # accuracy vs eps: PGD-40 with one random start on a seeded subset
    t = time.perf_counter()
    curve_size = cfg.curve_size if curve_size is None else curve_size
    if eps_grid is None:
        eps_grid = (
            EPS_GRID
            if cfg.curve_points == len(EPS_GRID)
            else tuple(round(float(e), 4) for e in np.linspace(0.0, EPS_GRID[-1], cfg.curve_points))
        )
    curve_split = subsample(test, curve_size, seed=cfg.seed) if curve_size > 0 else test
    xc, yc = curve_split.x, curve_split.y
    curve_clean = _predict(model, xc, bs) == yc if len(yc) else np.zeros(0, dtype=bool)
    curve_accs = []
    for i, e in enumerate(eps_grid):
        ok = _attack_survivors(
            model,
            classifier,
            "pgd",
            xc,
            yc,
            curve_clean,
            eps=float(e),
            batch_size=bs,
            steps=40,
            step_size=_pgd_step(float(e), 40),
            restarts=1,
            engine=engine,
            seed=attack_seed(cfg.seed, "curve", i),
        )
        curve_accs.append(accuracy(ok))
    seconds["curve"] = time.perf_counter() - t
    _progress("curve", seconds["curve"])

    pgd_ref = accs["test/pgd_subset_acc"].value if aa_acc is not None else accuracy(pgd100_ok).value
    warnings = gradient_masking_warnings(
        pgd_ref, aa_acc, sq_acc, list(eps_grid), [a.value for a in curve_accs]
    )

    metrics: dict[str, float] = {}
    for name, acc in accs.items():
        metrics.update(acc.as_metrics(name))
    metrics["test/n_eval"] = float(len(test))
    seconds["total"] = time.perf_counter() - t_start
    metrics["test/eval_seconds"] = seconds["total"]

    # figures
    curve_path = line_plot(
        {"PGD-40": ([float(e) for e in eps_grid], [a.value for a in curve_accs])},
        out_dir / "eps_curve.png",
        xlabel="L-inf eps",
        ylabel="robust accuracy",
        title=f"Accuracy vs eps (PGD-40, n={len(yc)})",
        bands={"PGD-40": ([a.ci_low for a in curve_accs], [a.ci_high for a in curve_accs])},
    )
    cols = min(GRID_COLUMNS, len(test))
    grid_path = out_dir / "adversarial_examples.png"
    if cols > 0:
        image_grid(
            [("clean", x[:cols]), (f"adv eps={eps:g}", x_adv[:cols])],
            y[:cols],
            [clean_pred[:cols], _predict(model, x_adv[:cols], bs)],
            grid_path,
            title=f"Clean vs worst PGD adversarial (label→prediction), eps={eps:g}",
        )

    pgd_library = (
        "ART ProjectedGradientDescent"
        if cfg.pgd_engine == "art"
        else "robustlab.attacks.tf_attacks.pgd_attack (matches ART's PGD, tested)"
    )
    info: dict[str, Any] = {
        "eps": eps,
        "pgd_engine": cfg.pgd_engine,
        "norm": "inf",
        "seed": cfg.seed,
        "n_eval": len(test),
        "n_autoattack": n_aa,
        "n_curve": len(yc),
        "pgd_restarts": R,
        "attacks": {
            "pgd40": {
                "library": pgd_library,
                "steps": 40,
                "step_size": _pgd_step(eps, 40),
                "random_starts": 1,
            },
            "autoattack": {
                "library": "ART AutoAttack",
                "attacks": ["APGD-CE", "APGD-DLR", "Square"],
                "apgd_steps": autoattack_steps,
                "square_queries": square_queries,
                "size": n_aa,
            },
            "square": {"library": "ART SquareAttack", "queries": square_queries, "size": n_aa},
        },
        "metrics": metrics,
        "accuracies": {
            name: {"value": a.value, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
            for name, a in accs.items()
        },
        "curve": {
            "attack": "PGD-40, one random start, step 2.5 eps / 40",
            "eps": [float(e) for e in eps_grid],
            "acc": [a.value for a in curve_accs],
            "ci_low": [a.ci_low for a in curve_accs],
            "ci_high": [a.ci_high for a in curve_accs],
            "n": len(yc),
        },
        "gradient_masking": bool(warnings),
        "warnings": warnings,
        "seconds": seconds,
        "excluded_sources_removed_by_caller": True,
        "source_indices_sha": _indices_digest(test.source_index),
    }
    if R > 0:
        info["attacks"][f"pgd100x{R}"] = {
            "library": pgd_library,
            "steps": 100,
            "step_size": _pgd_step(eps, 100),
            "restarts": R,
            "start_seeds": [attack_seed(cfg.seed, "pgd100", r) for r in range(R)],
            "note": "worst case with PGD-40; each restart attacks the survivors from a new start",
        }
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
