"""Aggregation across seeds and the claim verdicts, on synthetic per-seed results."""

from __future__ import annotations

import csv
import math

import pytest

from robustlab.errors import ConfigError
from robustlab.experiment.report import (
    CLEAN,
    INV,
    INV_BAL,
    PGD,
    aggregate,
    diff_ci,
    summarize,
    verdicts,
    write_comparison,
    write_report,
)
from robustlab.regimes import make_regime


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


def _results(
    joint_inv: float,
    seq_inv: float,
    target_inv: float,
    *,
    seq_pgd: float = 0.61,
    spread: float = 0.005,
) -> dict:
    """Per-seed results (3 seeds) whose claim verdicts are known from the report's rules."""
    base = {CLEAN: [0.99, 0.99, 0.99], PGD: [0.90, 0.91, 0.89]}
    inv = lambda m: [m - spread, m, m + spread]  # noqa: E731
    return {
        "perturbation": {**base, INV: inv(0.60)},
        "invariance": {CLEAN: [0.98] * 3, PGD: [0.0] * 3, INV: inv(0.80)},
        "invariance_target": {CLEAN: [0.5] * 3, PGD: [0.0] * 3, INV: inv(target_inv)},
        "sequential_ptb_inv": {
            CLEAN: [0.98] * 3,
            PGD: [seq_pgd - 0.01, seq_pgd + 0.01, seq_pgd],
            INV: inv(seq_inv),
        },
        "sequential_inv_ptb": {**base, INV: inv(0.60)},
        "joint": {**base, INV: inv(joint_inv)},
    }


S, N, I = "supported", "not supported", "inconclusive"  # noqa: E741


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        # human labels far above target labels; ptb->inv loses robustness; joint gains INV
        (_results(0.75, 0.75, 0.30), [S, S, S]),
        # target labels score higher; ptb->inv keeps PGD and gains INV (so claims 2, 3 fail)
        (_results(0.75, 0.75, 0.95, seq_pgd=0.90), [N, N, N]),
        # ptb->inv keeps PGD but gains nothing; joint gains nothing either
        (_results(0.60, 0.60, 0.30, seq_pgd=0.90), [S, S, N]),
        # seed-to-seed spread swamps every difference
        (_results(0.62, 0.62, 0.80, seq_pgd=0.90, spread=0.1), [I, I, I]),
    ],
)
def test_verdicts_follow_the_evidence(results, expected):
    assert [v.verdict for v in verdicts(results)] == expected


def test_one_seed_is_inconclusive_whatever_the_numbers():
    single = {k: {m: v[:1] for m, v in d.items()} for k, d in _results(0.75, 0.6, 0.3).items()}
    vs = verdicts(single)
    assert [v.verdict for v in vs] == [I, I, I]
    assert all("n/a (needs both regimes with >= 2 seeds)" in v.evidence for v in vs)


def test_comparison_and_report_files(tmp_path):
    results = _results(0.75, 0.75, 0.95, seq_pgd=0.90)  # every claim: not supported
    agg = aggregate(results)
    write_comparison(agg, tmp_path / "c.csv", tmp_path / "c.md")
    with open(tmp_path / "c.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(m) for m in results.values())
    joint_inv = next(r for r in rows if r["regime"] == "joint" and r["metric"] == INV)
    assert float(joint_inv["mean"]) == pytest.approx(0.75) and joint_inv["n_seeds"] == "3"
    md = (tmp_path / "c.md").read_text().splitlines()
    assert len(md) == 2 + len(results)
    write_report(tmp_path / "report.md", agg, results, {"budget": "test"})
    text = (tmp_path / "report.md").read_text()
    assert "| joint | simultaneous | 0.99 / 0.73 / 0.72 |" in text
    verdict_lines = [line.split("**")[1] for line in text.splitlines() if line.startswith("**")]
    assert verdict_lines == [N, N, N]
    assert "ours INV balanced" not in text  # not logged: no column


def test_balanced_inv_is_shown_beside_plain_inv(tmp_path):
    """A model that keeps every label scores high plain INV but only 0.5 balanced INV."""
    results = _results(0.75, 0.6, 0.3)
    results["vanilla"] = {
        CLEAN: [0.99, 0.99, 0.99],
        PGD: [0.0, 0.0, 0.0],
        INV: [0.79, 0.80, 0.81],
        INV_BAL: [0.49, 0.50, 0.51],
    }
    agg = aggregate(results)
    write_comparison(agg, tmp_path / "c.csv", tmp_path / "c.md")
    header, _, *rows = (tmp_path / "c.md").read_text().splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols.index(INV_BAL) == cols.index(INV) + 1
    vanilla = [
        c.strip() for c in next(r for r in rows if r.startswith("| vanilla")).strip("|").split("|")
    ]
    assert vanilla[cols.index(INV)].startswith("0.800 ± 0.010")
    assert vanilla[cols.index(INV_BAL)].startswith("0.500 ± 0.010")
    joint = [
        c.strip() for c in next(r for r in rows if r.startswith("| joint")).strip("|").split("|")
    ]
    assert joint[cols.index(INV_BAL)] == "–"  # regimes without it keep an empty cell

    write_report(tmp_path / "report.md", agg, results, {"budget": "test"})
    lines = (tmp_path / "report.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| regime | thesis run"))
    heads = [c.strip() for c in head.strip("|").split("|")]
    assert heads.index("ours INV balanced") == heads.index("ours INV") + 1
    row = [
        c.strip()
        for c in next(line for line in lines if line.startswith("| vanilla |"))
        .strip("|")
        .split("|")
    ]
    assert row[heads.index("ours INV")].startswith("0.800")
    assert row[heads.index("ours INV balanced")].startswith("0.500")


def test_unknown_regime_and_order():
    with pytest.raises(ConfigError, match="unknown regime"):
        make_regime("adversarial")
    with pytest.raises(ConfigError, match="unknown order"):
        make_regime("sequential", order="both")
