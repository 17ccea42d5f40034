"""The report's verdicts on constructed per-example tables.

Each constructed table fixes how often every regime is right, and draws the regimes dependently:
one uniform per (example, seed), shared by every regime and correlated between the two examples
of a source, decides each regime's outcome against its rate, so two regimes disagree only where
their rates differ (pairing) and a source's examples move together (clustering). Each claim part
lands where the test says: supported, not supported, inconclusive (near the threshold or
underpowered), or no verdict with fewer than three seeds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import norm

from robustlab.errors import RobustlabError
from robustlab.evaluation.intervals import Outcomes, effect
from robustlab.experiment.estimates import compute_figures
from robustlab.experiment.verdicts import (
    INCONCLUSIVE,
    NO_VERDICT,
    NOT_SUPPORTED,
    SUPPORTED,
    judge,
)

SEEDS = (0, 1, 2)
REGIMES = (
    "vanilla",
    "perturbation",
    "invariance",
    "invariance_target",
    "sequential_ptb_inv",
    "sequential_inv_ptb",
    "joint",
)


def _uniforms(n: int, seed: int, per_source: int = 2) -> np.ndarray:
    """n uniforms, correlated (0.6) within each source of `per_source` examples."""
    rng = np.random.default_rng(seed)
    shared = np.repeat(rng.normal(size=-(-n // per_source)), per_source)[:n]
    return norm.cdf(0.6 * shared + 0.8 * rng.normal(size=n))


def _tables(inv_rates, pgd_rates, n_changed=300, n_kept=600, n_test=2000, seeds=SEEDS):
    """Per-example tables: regime r right where the example's uniform (shared by every regime)
    lies below its rate inv_rates[r] = (changed, kept), robust below pgd_rates[r]."""
    inv_rows, test_rows = [], []
    n = n_changed + n_kept
    for s in seeds:
        u_inv, u_test = _uniforms(n, 100 + s), _uniforms(n_test, 200 + s, per_source=1)
        changed = np.arange(n) < n_changed
        for regime in REGIMES:
            ch, kp = inv_rates[regime]
            right = u_inv < np.where(changed, ch, kp)
            for i in range(n):
                inv_rows.append(
                    {
                        "set": "pool",
                        "index": i,
                        "source_index": i // 2,  # two examples per source
                        "label_changed": int(changed[i]),
                        "regime": regime,
                        "seed": s,
                        "correct": int(right[i]),
                    }
                )
            robust = u_test < pgd_rates[regime]
            for i in range(n_test):
                test_rows.append(
                    {
                        "source_index": i,
                        "regime": regime,
                        "seed": s,
                        "clean": 1,
                        "pgd40": int(robust[i]),
                    }
                )
    return inv_rows, test_rows


BASE = {regime: (0.2, 0.9) for regime in REGIMES}
PGD = {regime: 0.0 for regime in REGIMES} | {
    "perturbation": 0.9,
    "joint": 0.9,
    "sequential_ptb_inv": 0.5,
    "sequential_inv_ptb": 0.9,
}


def _parts(fig) -> dict[str, str]:
    return {p.part.key: p.verdict for c in fig.claims for p in c.parts}


def test_the_thesis_pattern_supports_every_claim():
    rates = BASE | {
        "invariance": (0.7, 0.9),  # human labels help over target labels
        "joint": (0.8, 0.9),  # joint gains on changed examples, keeps PGD
        "sequential_ptb_inv": (0.8, 0.9),  # gains, but loses PGD: does not help
    }
    fig = compute_figures(*_tables(rates, PGD), REGIMES, SEEDS)
    assert _parts(fig) == dict.fromkeys(["1", "2", "3a", "3b", "3c", "3d", "3e"], SUPPORTED)
    assert [c.verdict for c in fig.claims] == [SUPPORTED] * 3
    e = fig.effects[("joint", "perturbation", "changed")]
    assert e.estimate == pytest.approx(0.6, abs=0.06) and e.ci_low > 0.4
    assert e.n_examples == 300 and e.n_changed == 300 and e.n_clusters == 150 and e.n_seeds == 3
    # paired: the two regimes share their draws, so the difference is the rate gap only
    assert fig.inv["joint"]["all"]["changed"][0] > fig.inv["perturbation"]["all"]["changed"][0]
    assert fig.test["perturbation"]["pgd40"][0] == pytest.approx(0.9, abs=0.03)


def test_no_difference_is_not_supported_and_a_loss_of_robustness_fails_claim_3():
    rates = BASE | {"sequential_inv_ptb": (0.8, 0.9)}  # inv->ptb helps: claim 3 fails
    pgd = PGD | {"joint": 0.6}  # joint loses 0.3 of PGD-40
    fig = compute_figures(*_tables(rates, pgd), REGIMES, SEEDS)
    parts = _parts(fig)
    assert parts["1"] == NOT_SUPPORTED  # human and target labels alike
    assert parts["3a"] == parts["3b"] == NOT_SUPPORTED  # joint gains nothing
    assert parts["3c"] == NOT_SUPPORTED and parts["3e"] == NOT_SUPPORTED
    assert [c.verdict for c in fig.claims] == [NOT_SUPPORTED, SUPPORTED, NOT_SUPPORTED]


def test_claim_3_is_shown_with_and_without_its_pgd_part():
    rates = BASE | {"joint": (0.8, 0.9), "sequential_ptb_inv": (0.8, 0.9)}
    pgd = PGD | {"joint": 0.6}  # joint gains on invariance but loses PGD-40
    fig = compute_figures(*_tables(rates, pgd), REGIMES, SEEDS)
    claim3 = fig.claims[2]
    assert _parts(fig)["3c"] == NOT_SUPPORTED and claim3.verdict == NOT_SUPPORTED
    assert claim3.without == {"3c": SUPPORTED}
    assert fig.claims[0].without == {}  # a one-part claim has nothing to leave out


def test_an_effect_near_the_margin_is_inconclusive_and_says_why():
    rates = BASE | {"joint": (0.3, 0.9)}  # +0.10 on changed examples: right at the margin
    fig = compute_figures(*_tables(rates, PGD, n_changed=900), REGIMES, SEEDS)
    part = next(p for c in fig.claims for p in c.parts if p.part.key == "3a")
    assert part.verdict == INCONCLUSIVE and "straddles +0.10" in part.reason
    assert "near the threshold" in part.reason
    assert fig.planned[("joint", "perturbation", "changed")] < 0.10


def test_a_clear_interval_is_a_verdict_even_when_the_planned_mde_exceeds_the_margin():
    rates = BASE | {"joint": (0.9, 0.9)}  # a large gain, on 20 changed examples
    fig = compute_figures(*_tables(rates, PGD, n_changed=20, n_kept=40), REGIMES, SEEDS)
    part = next(p for c in fig.claims for p in c.parts if p.part.key == "3a")
    assert fig.planned[("joint", "perturbation", "changed")] > 0.10
    assert part.effects[0].ci_low > 0.10 and part.verdict == SUPPORTED


def test_a_small_straddling_comparison_is_called_underpowered():
    rates = BASE | {"joint": (0.3, 0.9)}
    fig = compute_figures(*_tables(rates, PGD, n_changed=20, n_kept=40), REGIMES, SEEDS)
    part = next(p for c in fig.claims for p in c.parts if p.part.key == "3a")
    assert part.verdict == INCONCLUSIVE and "underpowered" in part.reason


def test_fewer_than_three_seeds_give_effects_but_no_verdict():
    rates = BASE | {"invariance": (0.7, 0.9), "joint": (0.8, 0.9)}
    fig = compute_figures(*_tables(rates, PGD, seeds=(0,)), REGIMES, (0,))
    assert [c.verdict for c in fig.claims] == [NO_VERDICT] * 3
    part = fig.claims[0].parts[0]
    assert "no verdict: one training run" in part.reason and part.effects[0].estimate > 0.2


def test_judge_reads_the_interval_against_the_margin():
    base = effect("x", [Outcomes(np.ones((50, 3)), np.zeros((50, 3)), np.arange(50))])
    cases = [
        ("improves", 0.30, 0.20, 0.40, SUPPORTED),
        ("improves", 0.02, -0.01, 0.04, NOT_SUPPORTED),
        ("improves", 0.09, 0.03, 0.15, INCONCLUSIVE),
        ("keeps", -0.01, -0.03, 0.01, SUPPORTED),
        ("keeps", -0.20, -0.25, -0.15, NOT_SUPPORTED),
        ("keeps", -0.05, -0.08, -0.02, INCONCLUSIVE),
    ]
    for kind, est, low, high, want in cases:
        e = replace(base, estimate=est, ci_low=low, ci_high=high)
        for mde in (0.01, 0.5):  # the planned MDE never turns a clear interval inconclusive
            assert judge(e, kind, 0.05, mde)[0] == want, (kind, est, mde)
    straddling = replace(base, estimate=0.05, ci_low=0.0, ci_high=0.1)
    assert "underpowered" in judge(straddling, "improves", 0.05, 0.2)[1]
    assert "near the threshold" in judge(straddling, "improves", 0.05, 0.03)[1]


def test_a_table_with_an_example_predicted_twice_or_missing_is_refused():
    inv, test = _tables(BASE, PGD, n_changed=10, n_kept=10, n_test=10)
    with pytest.raises(RobustlabError, match="predicted .* twice"):
        compute_figures([*inv, inv[0]], test, REGIMES, SEEDS)
    missing = [r for r in inv if not (r["regime"] == "joint" and r["index"] == 3)]
    with pytest.raises(RobustlabError, match="joint: 3 .* missing"):
        compute_figures(missing, test, REGIMES, SEEDS)
