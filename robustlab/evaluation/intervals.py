"""Paired, per-example effects with intervals that account for example sampling and training
randomness.

A comparison of regime A with regime B rests on per-example outcomes `a[e, s]`, `b[e, s]` for
example e and training seed s (1 correct / robust, 0 not; a fraction when a regime has several
fold models that judge the same image). Examples belong to clusters (an MNIST source image: the
examples made from one image are not independent). A metric is a weighted mean of group means
(balanced accuracy: label-changed and label-kept, 1/2 each).

- **Estimate**: the mean over seeds of the per-seed effect d_s = sum_g w_g mean_e (a - b)[e, s].
- **Example part** of the variance: the cluster-robust (sandwich) variance of the seed-averaged
  per-example differences, C/(C-1) sum_c z_c^2 over the C clusters, z_c the cluster's summed
  influence sum_g w_g sum_{e in c, g} (x_e - mean_g x) / n_g. It covers sampling the examples
  (and their sources) and shrinks with more of them.
- **Seed part**: var_s(d_s) / S, the between-seed variance of the per-seed effects. Each regime
  is trained anew per seed, so a seed-level random effect (one run better than another) moves
  d_s; more examples cannot remove it, only more seeds can. It needs S >= 2.
- **Interval**: estimate +- t_{0.975, df} x SE, SE^2 the sum of the two parts, df by
  Welch-Satterthwaite from the parts' degrees of freedom (C - 1 and S - 1): with 3 seeds and a
  dominant seed part df is near 2 and the interval widens accordingly.

The suite checks coverage by simulation (`tests/test_intervals.py`): a known effect, source
clustering, dependent regimes and a seed-level random effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95


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
    def n_seeds(self) -> int:
        return int(self.a.shape[1])


@dataclass(frozen=True)
class Effect:
    """A paired effect A - B with its interval and what it rests on."""

    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    se: float
    se_examples: float  # the example-sampling part of the standard error
    se_seeds: float  # the seed part (NaN with one seed)
    df: float
    n_examples: int
    n_clusters: int
    n_seeds: int
    n_changed: int = 0  # label-changed examples it rests on (invariance metrics)
    seed_effects: tuple[float, ...] = ()  # d_s, one per seed


def _seed_effects(groups: list[Outcomes], weights: list[float]) -> np.ndarray:
    return sum(w * (g.a - g.b).mean(axis=0) for w, g in zip(weights, groups, strict=True))


def cluster_variance(groups: list[Outcomes], weights: list[float]) -> tuple[float, int]:
    """(Cluster-robust variance of the weighted mean of the groups' seed-averaged mean
    differences, number of clusters); clusters shared by several groups are summed once."""
    ids = np.unique(np.concatenate([g.cluster for g in groups]))
    z = np.zeros(len(ids))
    for w, g in zip(weights, groups, strict=True):
        x = (g.a - g.b).mean(axis=1)
        np.add.at(z, np.searchsorted(ids, g.cluster), w * (x - x.mean()) / len(x))
    c = len(ids)
    return (c / (c - 1) * float(np.sum(z**2)) if c > 1 else math.nan), c


def effect(
    metric: str, groups: list[Outcomes], weights: list[float] | None = None, n_changed: int = 0
) -> Effect:
    """The (weighted) effect over `groups` with its interval (see the module docstring)."""
    weights = weights or [1.0 / len(groups)] * len(groups)
    seeds = {g.n_seeds for g in groups}
    if len(seeds) != 1:
        raise ValueError(f"the groups must share their seeds, got {sorted(seeds)}")
    s = seeds.pop()
    d = _seed_effects(groups, weights)
    var_ex, c = cluster_variance(groups, weights)
    var_seed = float(np.var(d, ddof=1)) / s if s > 1 else math.nan
    parts = [(var_ex, c - 1)] + ([(var_seed, s - 1)] if s > 1 else [])
    var = sum(v for v, _ in parts)
    if var > 0 and all(math.isfinite(v) for v, _ in parts):
        df = var**2 / sum(v**2 / k for v, k in parts if v > 0)
    else:
        df = math.inf if var == 0 else math.nan
    se = math.sqrt(var) if math.isfinite(var) else math.nan
    half = float(student_t.ppf(0.5 + LEVEL / 2, df)) * se if math.isfinite(df) else 0.0
    if not math.isfinite(se):
        half = math.nan
    est = float(np.mean(d))
    return Effect(
        metric,
        est,
        est - half,
        est + half,
        se,
        math.sqrt(var_ex) if math.isfinite(var_ex) else math.nan,
        math.sqrt(var_seed) if math.isfinite(var_seed) else math.nan,
        df,
        int(sum(g.n_examples for g in groups)),
        c,
        s,
        n_changed,
        tuple(float(v) for v in d),
    )


def accuracy_interval(values: np.ndarray, cluster: np.ndarray) -> tuple[float, float, float]:
    """(mean, 95% low, 95% high) of one regime's per-example outcomes (examples, seeds): its
    effect against 0 by the same interval."""
    if not len(values):
        return math.nan, math.nan, math.nan
    e = effect("acc", [Outcomes(values.astype(float), np.zeros_like(values, float), cluster)])
    return e.estimate, e.ci_low, e.ci_high


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
