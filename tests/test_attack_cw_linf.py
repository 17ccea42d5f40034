"""CW-L∞ (robustlab/attacks/families/cw_linf.py, added as one module): its adversarials stay in
the ε-ball, and as an optional stage the evaluation, its summary, the masking check and the model
card show it with no other edit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_attacks import trained_model  # the same cached model (trained once per process)

from robustlab.data.mnist import subsample


@pytest.fixture(scope="module")
def model_and_test():
    return trained_model()


def test_cw_linf_adversarials_are_projected_onto_the_eps_ball(model_and_test):
    """ART's CW-L∞ returns the smallest L∞ adversarial it finds, whatever ε: stand in a result
    outside the ball for it and check the projection, then run ART's own on the model."""
    from robustlab.attacks import make_attack, make_classifier

    model, test = model_and_test
    x, y, eps = test.x[:6], test.y[:6], 0.1
    fast = {"steps": 2, "initial_const": 1e-2, "const_factor": 10.0, "decrease_factor": 0.5}
    attack = make_attack("cw_linf", make_classifier(model), eps=eps, **fast)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, x.shape).astype(np.float32)
    noise[0] *= 0.1  # one result inside the ball
    raw = np.clip(x + noise, 0.0, 1.0)

    class Beyond:  # ART's attack, as far as `generate` goes, with results beyond eps
        def generate(self, images, labels):
            return raw

    art_attack, attack.attack = attack.attack, Beyond()
    adv = attack.generate(x, y)
    assert np.abs(raw - x).max() > 2 * eps
    assert np.abs(adv - x).max() <= eps + 1e-6 and adv.min() >= 0.0 and adv.max() <= 1.0
    np.testing.assert_array_equal(adv[0], raw[0])  # within the ball nothing changes
    np.testing.assert_allclose(adv - x, np.clip(raw - x, -eps, eps), atol=1e-6)
    attack.attack = art_attack
    real = attack.generate(x, y)
    assert real.shape == x.shape and np.abs(real - x).max() <= eps + 1e-6


def test_cw_linf_search_parameters_are_checked_in_one_line(model_and_test):
    from robustlab.attacks import make_attack, make_classifier
    from robustlab.errors import ConfigError

    clf = make_classifier(model_and_test[0])
    with pytest.raises(ConfigError, match="decrease_factor must lie in") as info:
        make_attack("cw_linf", clf, eps=0.3, decrease_factor=1.5)
    assert "\n" not in str(info.value)


def test_reports_masking_and_card_show_the_cw_linf_stage(model_and_test, tmp_path):
    import json

    from robustlab.commands.eval_args import summary_line
    from robustlab.config import EvalConfig
    from robustlab.evaluation.robustness import (
        compute,
        gradient_masking_warnings,
        masking_checks,
        write_report,
    )
    from robustlab.register.card import figures_table

    model, test = model_and_test
    cfg = EvalConfig(
        eps=0.3,
        autoattack_size=12,
        pgd_restarts=0,
        curve_size=5,
        square_alone=False,
        extra_attacks=("cw_linf",),
    )
    small = subsample(test, 40, seed=4)
    ev = compute(model, small, cfg, eps_grid=(0.0, 0.3), square_queries=10, autoattack_steps=10)
    metrics = ev.metrics()
    cw, pgd = metrics["test/cw_linf_acc"], metrics["test/pgd_subset_acc"]
    assert cw <= pgd  # the worst case with PGD on the AutoAttack subset
    stage = next(r for r in ev.results if r.stage.name == "cw_linf")
    assert stage.n_attacked == round(pgd * 12) > 0  # the PGD survivors there
    write_report(ev, tmp_path)
    summary = (tmp_path / "evaluation.md").read_text()
    assert "`test/cw_linf_acc`" in summary and "CW-L∞ from ART" in summary
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["attacks"]["cw_linf"]["library"].startswith("ART CarliniLInfMethod")
    assert "CW-L∞ " in summary_line(metrics, cfg)
    card = figures_table({f"robustlab.{k}": f"{v:.6g}" for k, v in metrics.items()})
    assert any(row.startswith("| CW-L∞ (ART Carlini-Wagner") for row in card)
    # the masking check compares it with PGD on the same examples: had it broken every one
    broken = [replace(r, robust=np.zeros_like(r.robust)) if r is stage else r for r in ev.results]
    warnings = gradient_masking_warnings(masking_checks(replace(ev, results=broken)), [], [])
    assert [w for w in warnings if w.startswith("CW-L∞ accuracy 0.000 is more than 0.05 below")]
