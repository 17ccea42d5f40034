"""The effect interval: its standard error by hand on a tiny table, clustering and seeds widening
it, and its coverage on simulated experiments with a known effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from robustlab.evaluation.intervals import Outcomes, effect


def _tiny(cluster):
    a = np.array([[1, 1], [1, 0], [0, 0], [1, 1]], float)
    b = np.array([[0, 0], [0, 0], [0, 1], [1, 0]], float)
    return effect("x", [Outcomes(a, b, np.array(cluster))])


def test_the_standard_error_matches_a_hand_computation():
    e = _tiny([0, 0, 1, 2])
    # per-seed effects: seed 0 (1+1+0+0)/4 = 0.5, seed 1 (1+0-1+1)/4 = 0.25
    assert e.seed_effects == pytest.approx((0.5, 0.25))
    assert e.estimate == pytest.approx(0.375)
    # seed part: sample variance of (0.5, 0.25) = 0.03125, over 2 seeds
    var_seed = 0.03125 / 2
    # example part: seed-averaged differences (1, 0.5, -0.5, 0.5), mean 0.375; influences
    # (0.625, 0.125, -0.875, 0.125) / 4 summed per source: 0.1875, -0.21875, 0.03125
    var_ex = 3 / 2 * (0.1875**2 + 0.21875**2 + 0.03125**2)
    assert e.se_seeds == pytest.approx(math.sqrt(var_seed))
    assert e.se_examples == pytest.approx(math.sqrt(var_ex))
    assert e.se == pytest.approx(math.sqrt(var_ex + var_seed))
    df = (var_ex + var_seed) ** 2 / (var_ex**2 / 2 + var_seed**2 / 1)
    assert e.df == pytest.approx(df)
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(var_ex + var_seed)
    assert (e.ci_low, e.ci_high) == pytest.approx((0.375 - half, 0.375 + half))
    assert (e.n_examples, e.n_clusters, e.n_seeds) == (4, 3, 2)


def test_clustering_widens_the_interval_when_a_source_moves_together():
    together, apart = _tiny([0, 0, 1, 2]), _tiny([0, 1, 2, 3])
    assert together.se_examples > apart.se_examples
    assert together.ci_high - together.ci_low > apart.ci_high - apart.ci_low


def test_seeds_are_a_source_of_uncertainty_of_their_own():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, (400, 1))
    same = np.repeat(base, 3, axis=1)  # three identical training runs: no seed part
    shifted = same + np.array([-0.05, 0.0, 0.05])  # the same examples, one run up, one down
    zero = np.zeros_like(same)
    cluster = np.arange(400)
    calm = effect("x", [Outcomes(same, zero, cluster)])
    noisy = effect("x", [Outcomes(shifted, zero, cluster)])
    assert noisy.se_examples == pytest.approx(calm.se_examples)  # the same seed averages
    assert calm.se_seeds == 0 and noisy.se_seeds == pytest.approx(0.05 / math.sqrt(3))
    assert noisy.ci_high - noisy.ci_low > 2 * (calm.ci_high - calm.ci_low)
    one = effect("x", [Outcomes(same[:, :1], zero[:, :1], cluster)])
    assert math.isnan(one.se_seeds) and one.n_seeds == 1


def _simulate(rng, *, delta: float, seed_sd: float, seeds: int = 3, sources: int = 200):
    """One simulated comparison with a known effect `delta`: sources of 1-4 examples whose
    difficulty and outcomes are correlated within the source, two regimes drawn dependently
    (the same uniform decides both), a seed-level random effect per regime and seed."""
    sizes = rng.integers(1, 5, sources)
    cluster = np.repeat(np.arange(sources), sizes)
    n = len(cluster)
    p = 0.45 + rng.normal(0, 0.12, sources)[cluster] + rng.normal(0, 0.05, n)
    p = np.clip(p, 0.1, 0.8)
    u_a, u_b = rng.normal(0, seed_sd, seeds), rng.normal(0, seed_sd, seeds)
    shared = rng.normal(size=(sources, seeds))[cluster]
    latent = 0.7 * shared + math.sqrt(1 - 0.7**2) * rng.normal(size=(n, seeds))
    uniform = norm.cdf(latent)  # uniform, correlated within a source
    a = (uniform < p[:, None] + delta + u_a).astype(float)
    b = (uniform < p[:, None] + u_b).astype(float)
    return effect("x", [Outcomes(a, b, cluster)])


@pytest.mark.parametrize(("seed_sd", "floor"), [(0.03, 0.90), (0.0, 0.93)])
def test_the_interval_covers_the_true_effect(seed_sd, floor):
    rng = np.random.default_rng(20261206)
    runs, delta = 300, 0.05
    covered = 0
    for _ in range(runs):
        e = _simulate(rng, delta=delta, seed_sd=seed_sd)
        covered += e.ci_low <= delta <= e.ci_high
    coverage = covered / runs
    print(f"coverage with seed SD {seed_sd}: {coverage:.3f} over {runs} simulations")
    assert coverage >= floor
