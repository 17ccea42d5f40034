"""Staged evaluation: an ordered list of attacks, each run on the survivors of the ones before.

AutoAttack's shape (Croce & Hein 2020) applied to the whole evaluation: an example that is
misclassified clean, or already broken by an earlier stage on the same subset, is not robust
whatever a later stage does, so a stage attacks only the examples still standing. The flags after
the last stage of a subset are exactly the per-example worst case over all its stages (the AND of
what every stage alone would report), and cost grows only with the robust examples. Each stage
records its seconds, examples attacked and broken, gradient steps (when known) and seeds.

A stage marked `independent` attacks every clean-correct example of its subset instead and feeds
no survivors on (the stand-alone Square check, and every eps-curve point in the pre-issue-11
cost mode); `worst_case` still ANDs it in. A stage marked `after_all` attacks only the examples
of its subset that also survived every stage so far on subset "all" (AutoAttack after PGD).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustlab.attacks.art_factory import make_classifier
from robustlab.attacks.registry import Stage, check_stage, make_attack, stage_seeds
from robustlab.attacks.tf_attacks import pgd_attack
from robustlab.config import pgd_step_size
from robustlab.errors import ConfigError
from robustlab.evaluation.stats import predict_logits

# robustlab's PGD computes in fixed chunks of rows whatever the batch, so one batch can hold
# many examples: a batch's tail (few examples left, padded to a chunk) then costs once per 1,024
# images, not once per 500. Memory grows with the batch (about 135 MB per 1,000 rows: 10,000
# rows lifted a full-test-set evaluation to 2.9 GB peak RSS, 1,024 rows keep it near 1.3 GB)
ROBUSTLAB_PGD_BATCH = 1024


@dataclass
class StageResult:
    stage: Stage
    robust: np.ndarray  # flags over the stage's subset after it (worst case over its chain)
    n_attacked: int  # examples the stage attacked (its first restart)
    n_broken: int  # of those, broken by the stage
    seconds: float
    gradient_steps: int | None  # examples x steps pushed through forward/backward; None: unknown
    seeds: list[int] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far, after the stage

    def record(self) -> dict[str, Any]:
        """The stage as it goes into evaluation.json."""
        s = self.stage
        return {
            "name": s.name,
            "attack": s.attack,
            "engine": s.engine,
            "eps": s.eps,
            "steps": s.steps,
            "restarts": s.restarts,
            "subset": s.subset,
            "independent": s.independent,
            "after_all": s.after_all,
            "n_attacked": self.n_attacked,
            "n_broken": self.n_broken,
            "seconds": self.seconds,
            "gradient_steps": self.gradient_steps,
            "seeds": self.seeds,
            "peak_rss_mb": self.peak_rss_mb,
        }


def _attack(
    model,
    classifier_fn: Callable[[], Any],
    stage: Stage,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    batch_size: int,
    early_exit: bool,
    stats: dict[str, int],
    starts: np.ndarray | None = None,
) -> np.ndarray:
    """One run of `stage`'s attack (one restart) on (x, y); returns the adversarial images.

    `starts`: robustlab PGD's random starts (uniform in [-1, 1], x's shape)."""
    if stage.attack == "pgd" and stage.engine == "robustlab":
        return pgd_attack(
            model,
            x,
            y,
            eps=stage.eps,
            steps=stage.steps,
            step_size=pgd_step_size(stage.eps, stage.steps),
            restarts=1,
            batch_size=max(batch_size, ROBUSTLAB_PGD_BATCH),
            seed=seed,
            early_exit=early_exit,
            stats=stats,
            starts=starts,
        )
    if stage.attack == "pgd":  # ART's PGD runs every step on every example
        stats["gradient_steps"] = stats.get("gradient_steps", 0) + len(x) * stage.steps
    attack = make_attack(
        stage.attack, classifier_fn(), eps=stage.eps, **stage.art_params(batch_size)
    )
    np.random.seed(seed)  # ART's random starts come from numpy's global generator
    return attack.generate(x, y).astype(np.float32)


def run_stages(
    model,
    x: np.ndarray,
    y: np.ndarray,
    clean_ok: np.ndarray,
    subsets: dict[str, np.ndarray],
    stages: Sequence[Stage],
    *,
    seed: int,
    batch_size: int,
    early_exit: bool = True,
    adv_out: np.ndarray | None = None,
    classifier=None,
    progress: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run `stages` in order; each attacks the survivors of the earlier stages on its subset.

    `subsets` maps a subset name to indices into `x`; a subset starts from `clean_ok` on those
    indices. `adv_out` (shape of `x`), when given, receives the adversarial that broke each
    example in a chained stage on subset "all". `early_exit=False` makes robustlab's PGD run
    every step on every example (the cost before issue 11; chaining is the stage list's choice).
    """
    classifiers = [classifier]

    def classifier_fn():
        if classifiers[0] is None:
            classifiers[0] = make_classifier(model)
        return classifiers[0]

    flags = {name: np.asarray(clean_ok)[idx].copy() for name, idx in subsets.items()}
    alive_all = np.asarray(clean_ok, dtype=bool).copy()  # survivors of chain "all", per image
    results: list[StageResult] = []
    for stage in stages:
        check_stage(stage)
        if stage.subset not in subsets:
            raise ConfigError(f"stage {stage.name}: no subset {stage.subset!r} given")
        idx = subsets[stage.subset]
        start = np.asarray(clean_ok)[idx] if stage.independent else flags[stage.subset]
        if stage.after_all and "all" in subsets:
            start = start & alive_all[idx]
        t = time.perf_counter()
        run = _StageRun(model, classifier_fn, stage, x, y, idx, batch_size, early_exit)
        robust = run.attack(start.copy(), seed, adv_out)
        result = StageResult(
            stage=stage,
            robust=robust,
            n_attacked=int(start.sum()) if stage.eps > 0 else 0,
            n_broken=int(start.sum() - robust.sum()),
            seconds=time.perf_counter() - t,
            gradient_steps=None if stage.attack != "pgd" else run.stats.get("gradient_steps", 0),
            seeds=run.seeds(seed),
            peak_rss_mb=peak_rss_mb(),
        )
        if not stage.independent:
            flags[stage.subset] = robust
            if stage.subset == "all":
                alive_all[idx] = robust
        results.append(result)
        if progress is not None:
            progress(result)
    return results


@dataclass
class _StageRun:
    """One stage on its subset `idx` of (x, y): every restart on the examples still robust."""

    model: Any
    classifier_fn: Callable[[], Any]
    stage: Stage
    x: np.ndarray
    y: np.ndarray
    idx: np.ndarray
    batch_size: int
    early_exit: bool
    stats: dict[str, int] = field(default_factory=dict)

    def seeds(self, seed: int) -> list[int]:
        return stage_seeds(self.stage, seed)

    def attack(self, robust: np.ndarray, seed: int, adv_out: np.ndarray | None) -> np.ndarray:
        """The flags after every restart; `adv_out` gets the breaking adversarials (chained
        stages on subset "all")."""
        stage, x, idx = self.stage, self.x, self.idx
        for restart_seed in self.seeds(seed):
            alive = np.flatnonzero(robust)
            if stage.eps == 0 or len(alive) == 0:
                break
            xs, ys = x[idx[alive]], self.y[idx[alive]]
            starts = None
            if stage.attack == "pgd" and stage.engine == "robustlab":
                # one draw over the whole subset: an example's start does not depend on which
                # other examples are still alive (chained == alone, example by example)
                rng = np.random.default_rng(restart_seed)
                u = rng.random((len(idx), *x.shape[1:]), dtype=np.float32)
                starts = 2.0 * u[alive] - 1.0
            adv = _attack(
                self.model,
                self.classifier_fn,
                stage,
                xs,
                ys,
                seed=restart_seed,
                batch_size=self.batch_size,
                early_exit=self.early_exit,
                stats=self.stats,
                starts=starts,
            )
            broken = predict_logits(self.model, adv, self.batch_size).argmax(axis=1) != ys
            robust[alive[broken]] = False
            if adv_out is not None and stage.subset == "all" and not stage.independent:
                adv_out[idx[alive[broken]]] = adv[broken]
        return robust


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worst_case(results: Sequence[StageResult], subset: str, start: np.ndarray) -> np.ndarray:
    """Per-example worst case on `subset`: `start` (e.g. clean-correct) AND every stage's flags."""
    out = np.asarray(start, dtype=bool).copy()
    for r in results:
        if r.stage.subset == subset:
            out &= r.robust
    return out
