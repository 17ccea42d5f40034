"""The report's statistics and verdicts on constructed per-example tables, and the folds.

Each constructed table fixes what every regime got right, so each claim part lands where the
test says: supported, not supported, inconclusive because its interval straddles the margin, or
inconclusive because the comparison is too small to see an effect of the margin's size."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.evaluation.bootstrap import Outcomes, effect, mcnemar_p
from robustlab.experiment.figures import compute_figures
from robustlab.experiment.verdicts import (
    INCONCLUSIVE,
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


def _pattern(n: int, rate: float, seed: int) -> np.ndarray:
    """n outcomes of which round(rate * n) are 1, in a seeded order."""
    out = np.zeros(n, dtype=int)
    out[: round(rate * n)] = 1
    return np.random.default_rng(seed).permutation(out)


def _tables(inv_rates: dict, pgd_rates: dict, n_changed=300, n_kept=600, n_test=2000):
    """Per-example tables where regime r is right on a share inv_rates[r] = (changed, kept) of
    the examples (each seed its own draw) and robust on pgd_rates[r] of the test images."""
    inv_rows, test_rows = [], []
    for r, regime in enumerate(REGIMES):
        ch, kp = inv_rates[regime]
        for s in SEEDS:
            right = np.concatenate(
                [_pattern(n_changed, ch, 100 * r + s), _pattern(n_kept, kp, 7 * r + s)]
            )
            for i in range(n_changed + n_kept):
                inv_rows.append(
                    {
                        "set": "pool",
                        "index": i,
                        "source_index": i // 2,  # two examples per source
                        "label_changed": int(i < n_changed),
                        "regime": regime,
                        "seed": s,
                        "correct": int(right[i]),
                    }
                )
            robust = _pattern(n_test, pgd_rates[regime], 31 * r + s)
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
    assert e.estimate == pytest.approx(0.6) and e.ci_low > 0.5 and e.mde < 0.1
    assert e.n_examples == 300 and e.n_changed == 300 and e.n_clusters == 150
    assert fig.inv["joint"]["all"]["changed"][0] == pytest.approx(0.8)
    assert fig.test["perturbation"]["pgd40"][0] == pytest.approx(0.9)


def test_no_difference_is_not_supported_and_a_loss_of_robustness_fails_claim_3():
    rates = BASE | {"sequential_inv_ptb": (0.8, 0.9)}  # inv->ptb helps: claim 3 fails
    pgd = PGD | {"joint": 0.6}  # joint loses 0.3 of PGD-40
    fig = compute_figures(*_tables(rates, pgd), REGIMES, SEEDS)
    parts = _parts(fig)
    assert parts["1"] == NOT_SUPPORTED  # human and target labels alike
    assert parts["3a"] == parts["3b"] == NOT_SUPPORTED  # joint gains nothing
    assert parts["3c"] == NOT_SUPPORTED and parts["3e"] == NOT_SUPPORTED
    assert [c.verdict for c in fig.claims] == [NOT_SUPPORTED, SUPPORTED, NOT_SUPPORTED]


def test_an_effect_near_the_margin_is_inconclusive_and_says_why():
    rates = BASE | {"joint": (0.3, 0.9)}  # +0.10 on changed examples: right at the margin
    fig = compute_figures(*_tables(rates, PGD, n_changed=900), REGIMES, SEEDS)
    part = next(p for c in fig.claims for p in c.parts if p.part.key == "3a")
    assert part.verdict == INCONCLUSIVE and "straddles +0.10" in part.reason


def test_too_few_examples_are_inconclusive_by_power():
    rates = BASE | {"joint": (0.6, 0.9)}  # a large gain, but on 12 changed examples
    fig = compute_figures(*_tables(rates, PGD, n_changed=12, n_kept=40), REGIMES, SEEDS)
    part = next(p for c in fig.claims for p in c.parts if p.part.key == "3a")
    assert part.verdict == INCONCLUSIVE and "smallest effect" in part.reason
    assert part.effects[0].mde > 0.10


def test_judge_reads_the_interval_against_the_margin():
    from dataclasses import replace

    base = effect("x", [Outcomes(np.ones((50, 2)), np.zeros((50, 2)), np.arange(50))])
    cases = [
        ("improves", 0.30, 0.20, 0.40, SUPPORTED),
        ("improves", 0.02, -0.01, 0.04, NOT_SUPPORTED),
        ("improves", 0.09, 0.03, 0.15, INCONCLUSIVE),
        ("keeps", -0.01, -0.03, 0.01, SUPPORTED),
        ("keeps", -0.20, -0.25, -0.15, NOT_SUPPORTED),
        ("keeps", -0.05, -0.08, -0.02, INCONCLUSIVE),
    ]
    for kind, est, low, high, want in cases:
        e = replace(base, estimate=est, ci_low=low, ci_high=high, mde=0.01)
        assert judge(e, kind, 0.05)[0] == want, (kind, est)
    assert judge(replace(base, mde=0.2), "improves", 0.05)[0] == INCONCLUSIVE


def test_mcnemar_is_exact_on_the_discordant_pairs():
    a = np.array([1] * 10 + [0] * 0 + [1] * 5)
    b = np.array([0] * 10 + [0] * 0 + [1] * 5)
    assert mcnemar_p(a, b) == pytest.approx(2 * 0.5**10)
    assert mcnemar_p(a, a) == 1.0
