"""Paired, per-example statistics of the experiment: effects, hierarchical bootstrap intervals,
exact McNemar tests and minimum detectable effects.

A comparison of regime A with regime B on a metric rests on per-example outcomes: `a[e, s]` and
`b[e, s]` for example e and training seed s (1 correct / robust, 0 not; a fraction when a regime
has several fold models that judge the same test image). Examples belong to clusters (an MNIST
source image: the examples made from one image are not independent). The effect is the mean of
`a - b` over the examples and seeds of the metric's group(s); balanced accuracy is the mean of
the label-changed and label-kept effects.

- **Interval**: a hierarchical bootstrap (resample clusters with replacement, then seeds with
  replacement; `N_BOOT` resamples, seeded), the 2.5 and 97.5 percentiles.
- **Second check**: an exact McNemar test per seed (the two-sided binomial test on the
  discordant examples; for fractions, the sign test on per-example differences, which is
  McNemar's test when outcomes are 0/1).
- **Minimum detectable effect** at 80% power and 5% two-sided level: (z_0.975 + z_0.8) x the
  bootstrap standard error = 2.80 x SE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm

N_BOOT = 2000
BOOT_SEED = 20261204
Z_POWER = float(norm.ppf(0.975) + norm.ppf(0.80))  # 2.80


@dataclass(frozen=True)
class Outcomes:
    """Paired per-example outcomes of two regimes on one group of examples.

    `a`, `b`: (examples, seeds) in [0, 1]; `cluster`: each example's cluster id (its source)."""

    a: np.ndarray
    b: np.ndarray
    cluster: np.ndarray

    @property
    def n_examples(self) -> int:
        return int(self.a.shape[0])

    @property
    def n_clusters(self) -> int:
        return len(np.unique(self.cluster))

    @property
    def n_seeds(self) -> int:
        return int(self.a.shape[1])


def _cluster_sums(o: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """(per cluster and seed: sum of a - b; per cluster: number of examples)."""
    ids, inverse = np.unique(o.cluster, return_inverse=True)
    diff = np.zeros((len(ids), o.n_seeds))
    np.add.at(diff, inverse, o.a - o.b)
    counts = np.bincount(inverse, minlength=len(ids)).astype(float)
    return diff, counts


def boot_effects(groups: list[Outcomes], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """`n_boot` bootstrap replicates of the mean effect of each group (n_boot, len(groups)).

    Clusters are resampled once per replicate across all groups (a source's changed and kept
    examples move together) and seeds once per replicate; the groups must share their seeds."""
    rng = np.random.default_rng(seed)
    all_clusters = np.unique(np.concatenate([g.cluster for g in groups]))
    n_seeds = groups[0].n_seeds
    w = rng.multinomial(
        len(all_clusters), np.full(len(all_clusters), 1 / len(all_clusters)), n_boot
    )
    v = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), n_boot)
    out = np.empty((n_boot, len(groups)))
    for j, g in enumerate(groups):
        ids = np.unique(g.cluster)
        sums, counts = _cluster_sums(g)
        wg = w[:, np.searchsorted(all_clusters, ids)]  # (n_boot, clusters of this group)
        num = np.einsum("bc,cs,bs->b", wg, sums, v)
        den = (wg @ counts) * v.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = num / den
    return out


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of paired outcomes (sign test on a - b)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    return 1.0 if pos + neg == 0 else float(binomtest(pos, pos + neg, 0.5).pvalue)


@dataclass(frozen=True)
class Effect:
    """A paired effect with its bootstrap interval, McNemar p-values and power."""

    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    se: float
    mde: float  # minimum detectable effect at 80% power
    mcnemar_p: tuple[float, ...]  # one per seed
    n_examples: int
    n_clusters: int
    n_seeds: int
    n_changed: int = 0  # label-changed examples it rests on (invariance metrics)


def effect(
    metric: str, groups: list[Outcomes], weights: list[float] | None = None, n_changed: int = 0
) -> Effect:
    """The (weighted) mean over `groups` of each group's mean effect (balanced accuracy: the
    changed and kept groups, weights 1/2 each), with its bootstrap interval and power."""
    weights = weights or [1.0 / len(groups)] * len(groups)
    point = sum(w * float(np.mean(g.a - g.b)) for w, g in zip(weights, groups, strict=True))
    boot = boot_effects(groups) @ np.asarray(weights)
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (math.nan, math.nan)
    se = float(np.std(boot, ddof=1)) if len(boot) > 1 else math.nan
    a = np.concatenate([g.a for g in groups])
    b = np.concatenate([g.b for g in groups])
    return Effect(
        metric,
        point,
        float(low),
        float(high),
        se,
        Z_POWER * se,
        tuple(mcnemar_p(a[:, s], b[:, s]) for s in range(a.shape[1])),
        int(sum(g.n_examples for g in groups)),
        len(np.unique(np.concatenate([g.cluster for g in groups]))),
        groups[0].n_seeds,
        n_changed,
    )


def accuracy_interval(values: np.ndarray, cluster: np.ndarray) -> tuple[float, float, float]:
    """(mean, 95% low, 95% high) of one regime's per-example outcomes (examples, seeds), by the
    same hierarchical bootstrap (its effect against 0)."""
    zero = np.zeros_like(values, dtype=float)
    boot = boot_effects([Outcomes(values.astype(float), zero, cluster)])[:, 0]
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return math.nan, math.nan, math.nan
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(np.mean(values)), float(low), float(high)


def invariance_intervals(
    correct: np.ndarray, changed: np.ndarray, cluster: np.ndarray
) -> dict[str, tuple[float, float, float, int]]:
    """Label-changed, label-kept and balanced accuracy of per-example outcomes (examples, seeds),
    each (mean, 95% low, 95% high, examples); balanced only when both groups are present."""
    out: dict[str, tuple[float, float, float, int]] = {}
    for name, mask in (("changed", changed), ("kept", ~changed)):
        out[name] = (*accuracy_interval(correct[mask], cluster[mask]), int(mask.sum()))
    if changed.any() and (~changed).any():
        zero = np.zeros_like(correct, dtype=float)
        groups = [
            Outcomes(correct[m].astype(float), zero[m], cluster[m]) for m in (changed, ~changed)
        ]
        e = effect("balanced", groups, [0.5, 0.5])
        out["balanced"] = (e.estimate, e.ci_low, e.ci_high, len(changed))
    return out
