"""Aggregation across seeds and the claim verdicts, on synthetic per-seed results."""

from __future__ import annotations

import csv
import math

import pytest

from robustlab.errors import ConfigError
from robustlab.regimes import make_regime
from robustlab.report import (
    CLEAN,
    INV,
    PGD,
    aggregate,
    diff_ci,
    summarize,
    verdicts,
    write_comparison,
    write_report,
)


def test_summary_is_mean_std_and_t_interval():
    s = summarize([0.9, 0.92, 0.94])
    assert s.mean == pytest.approx(0.92) and s.std == pytest.approx(0.02) and s.n == 3
    assert s.ci_high - s.mean == pytest.approx(
        4.302653 * 0.02 / math.sqrt(3), rel=1e-5
    )  # t(0.975, 2)
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.ci_low)


def test_accuracy_intervals_are_clipped_to_their_range_and_other_metrics_are_not():
    near_one = [1.0, 1.0, 0.96]  # unclipped t-interval reaches above 1
    assert summarize(near_one).ci_high > 1.0
    agg = aggregate(
        {
            "r": {
                "test/inv_acc_kept/tramer_linf_eps0.3": near_one,
                "test/eval_seconds": [-1.0, 1.0, 2.0],
            }
        }
    )["r"]
    kept = agg["test/inv_acc_kept/tramer_linf_eps0.3"]
    assert kept.ci_high == 1.0 and kept.ci_low == pytest.approx(summarize(near_one).ci_low)
    assert agg["test/eval_seconds"].ci_low < -1.0  # not an accuracy: left as computed


def test_welch_difference_interval():
    d, lo, hi = diff_ci([0.8, 0.82, 0.81], [0.5, 0.52, 0.51])
    assert d == pytest.approx(0.3) and 0.25 < lo < d < hi < 0.35
    assert diff_ci([0.8], [0.5, 0.6]) is None


def _results(joint_inv: float, seq_inv: float, target_inv: float) -> dict:
    base = {CLEAN: [0.99, 0.99, 0.99], PGD: [0.90, 0.91, 0.89]}
    jitter = [-0.005, 0.0, 0.005]
    inv = lambda m: [m + j for j in jitter]  # noqa: E731
    return {
        "perturbation": {**base, INV: inv(0.60)},
        "invariance": {CLEAN: [0.98] * 3, PGD: [0.0] * 3, INV: inv(0.80)},
        "invariance_target": {CLEAN: [0.5] * 3, PGD: [0.0] * 3, INV: inv(target_inv)},
        "sequential_ptb_inv": {CLEAN: [0.98] * 3, PGD: [0.6, 0.62, 0.61], INV: inv(seq_inv)},
        "sequential_inv_ptb": {**base, INV: inv(0.60)},
        "joint": {**base, INV: inv(joint_inv)},
    }


def test_verdicts_follow_the_evidence():
    v = verdicts(_results(joint_inv=0.75, seq_inv=0.75, target_inv=0.3))
    assert [x.verdict for x in v] == ["supported", "supported", "supported"]
    # the sequential regime keeps robustness and gains INV: claims 2 and 3 fail
    r = _results(joint_inv=0.75, seq_inv=0.75, target_inv=0.3)
    r["sequential_ptb_inv"][PGD] = [0.90, 0.91, 0.89]
    v = verdicts(r)
    assert v[1].verdict == "not supported" and v[2].verdict == "not supported"
    # joint gains nothing -> claim 3 not supported; one seed only -> inconclusive
    assert (
        verdicts(_results(joint_inv=0.60, seq_inv=0.60, target_inv=0.3))[2].verdict
        == "not supported"
    )
    single = {
        k: {m: vals[:1] for m, vals in d.items()} for k, d in _results(0.75, 0.6, 0.3).items()
    }
    assert {x.verdict for x in verdicts(single)} == {"inconclusive"}


def test_comparison_and_report_files(tmp_path):
    results = _results(joint_inv=0.75, seq_inv=0.6, target_inv=0.3)
    agg = aggregate(results)
    write_comparison(agg, tmp_path / "c.csv", tmp_path / "c.md")
    with open(tmp_path / "c.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(m) for m in results.values())
    assert {r["regime"] for r in rows} == set(results)
    md = (tmp_path / "c.md").read_text().splitlines()
    assert len(md) == 2 + len(results)
    vs = write_report(tmp_path / "report.md", agg, results, {"budget": "test"})
    text = (tmp_path / "report.md").read_text()
    assert "| joint | simultaneous | 0.99 / 0.73 / 0.72 |" in text
    for v in vs:
        assert f"**{v.verdict}**" in text


def test_unknown_regime_and_order():
    with pytest.raises(ConfigError, match="unknown regime"):
        make_regime("adversarial")
    with pytest.raises(ConfigError, match="unknown order"):
        make_regime("sequential", order="both")
