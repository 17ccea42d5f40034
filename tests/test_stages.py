"""Staged evaluation (issue 11): early-exit PGD, survivor chaining, per-stage cost, defaults."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_attacks import trained_model  # the same cached model (trained once per process)

from robustlab.data.mnist import subsample


@pytest.fixture(scope="module")
def model_and_test():
    return trained_model()


def _predict(model, x):
    from robustlab.evaluation.stats import predict_logits

    return predict_logits(model, x, 500).argmax(1)


def test_early_exit_keeps_the_robust_flags_and_costs_fewer_steps(model_and_test):
    from robustlab.attacks import pgd_attack

    model, test = model_and_test
    small = subsample(test, 200, seed=11)
    ok = _predict(model, small.x) == small.y
    x, y = small.x[ok], small.y[ok]
    eps = 0.3
    kw = {"eps": eps, "steps": 40, "step_size": 2.5 * eps / 40, "batch_size": 128, "seed": 7}
    full_stats: dict[str, int] = {}
    fast_stats: dict[str, int] = {}
    full = pgd_attack(model, x, y, early_exit=False, stats=full_stats, **kw)
    fast = pgd_attack(model, x, y, early_exit=True, stats=fast_stats, **kw)
    robust_full = _predict(model, full) == y
    robust_fast = _predict(model, fast) == y
    assert 0.1 < robust_full.mean() < 0.9  # partly robust: the loop has work and can exit

    assert np.abs(fast - x).max() <= eps + 1e-6 and fast.min() >= 0.0 and fast.max() <= 1.0
    np.testing.assert_array_equal(robust_fast, robust_full)
    # an example never broken runs every step on exactly the full run's trajectory
    np.testing.assert_array_equal(fast[robust_fast], full[robust_fast])

    assert full_stats["gradient_steps"] == 40 * len(x)
    assert fast_stats["gradient_steps"] >= 40 * int(robust_fast.sum())  # survivors ran all
    assert fast_stats["gradient_steps"] < 0.8 * full_stats["gradient_steps"]


def test_chained_stages_give_exactly_the_worst_case_of_the_stages_alone(model_and_test):
    from robustlab.attacks.registry import Stage
    from robustlab.evaluation.stages import run_stages, worst_case

    model, test = model_and_test
    small = subsample(test, 200, seed=12)
    x, y = small.x, small.y
    clean_ok = _predict(model, x) == y
    subsets = {"all": np.arange(len(y))}
    stages = [
        Stage("a", "pgd", 0.25, steps=3, seed_stream="pgd100", seed_index=0),
        Stage("b", "pgd", 0.25, steps=3, seed_stream="pgd100", seed_index=1),
        Stage("c", "pgd", 0.3, steps=3, seed_stream="pgd100", seed_index=2),
    ]
    kw = {"seed": 3, "batch_size": 100}
    chained = run_stages(model, x, y, clean_ok, subsets, stages, **kw)
    alone = run_stages(
        model, x, y, clean_ok, subsets, [replace(s, independent=True) for s in stages], **kw
    )
    flags = [r.robust for r in alone]
    # each stage alone breaks examples the others leave standing, so the AND is not one of them
    assert all((flags[i] & ~flags[j]).any() for i, j in ((0, 1), (1, 0)))
    expected = clean_ok & flags[0] & flags[1] & flags[2]
    np.testing.assert_array_equal(chained[-1].robust, expected)
    np.testing.assert_array_equal(worst_case(alone, "all", clean_ok), expected)
    # chaining attacks only survivors: fewer examples, fewer gradient steps
    assert [r.n_attacked for r in chained[1:]] == [
        int(chained[0].robust.sum()),
        int(chained[1].robust.sum()),
    ]
    assert sum(r.gradient_steps for r in chained) < sum(r.gradient_steps for r in alone)
    assert sum(r.n_broken for r in chained) == int(clean_ok.sum() - expected.sum())


def test_the_eps_curve_is_chained_in_ascending_eps(model_and_test, tmp_path):
    """evaluation.json lists every stage with its cost; each curve point attacks only the
    survivors of the previous (smaller) eps."""
    import json

    from robustlab.config import EvalConfig
    from robustlab.evaluation.robustness import evaluate_and_log

    model, test = model_and_test
    small = subsample(test, 100, seed=13)
    cfg = EvalConfig(eps=0.2, autoattack_size=0, pgd_restarts=1, pgd_steps=10, batch_size=100)
    metrics = evaluate_and_log(
        model, small, cfg, out_dir=tmp_path, log=False, eps_grid=(0.0, 0.1, 0.2), curve_size=60
    )
    assert "test/pgd10x1_acc" in metrics and "test/pgd100x1_acc" not in metrics
    report = json.loads((tmp_path / "evaluation.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["pgd40", "pgd10x1", "curve@0", "curve@0.1", "curve@0.2"]
    for s in report["stages"]:
        assert {"attack", "engine", "steps", "restarts", "subset", "seconds"} <= set(s)
        assert s["seconds"] >= 0 and 0 <= s["n_broken"] <= s["n_attacked"]
        assert s["engine"] == "robustlab" and s["attack"] == "pgd"
    n_clean = round(metrics["test/clean_acc"] * 100)
    assert stages["pgd40"]["n_attacked"] == n_clean
    assert stages["pgd10x1"]["n_attacked"] == n_clean - stages["pgd40"]["n_broken"]
    assert stages["curve@0"]["n_attacked"] == 0  # eps 0: nothing to attack
    assert stages["curve@0.2"]["n_attacked"] == (
        stages["curve@0.1"]["n_attacked"] - stages["curve@0.1"]["n_broken"]
    )
    assert stages["curve@0.1"]["n_broken"] > 0
    assert report["seconds"]["total"] >= report["seconds"]["curve"] > 0
    curve = report["curve"]["acc"]
    assert curve[0] >= curve[1] >= curve[2]


def test_end_of_training_uses_the_in_graph_engine_and_evaluate_uses_art(tracking):
    from robustlab.cli import build_parser
    from robustlab.commands.evaluate import config_from_args
    from robustlab.commands.train import configs

    train_ev = configs(build_parser().parse_args(["vanilla"]))[1]
    assert train_ev.pgd_engine == "robustlab" and train_ev.early_exit
    uri = ["--model-uri", "runs:/0123456789abcdef/model"]
    ev = config_from_args(build_parser().parse_args(["evaluate", *uri]))
    assert ev.pgd_engine == "art" and ev.pgd_steps == 100
    ev = config_from_args(
        build_parser().parse_args(["evaluate", *uri, "--pgd-steps", "40", "--pgd-restarts", "10"])
    )
    assert (ev.pgd_steps, ev.pgd_restarts) == (40, 10)
