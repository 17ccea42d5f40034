"""The attack registry: attacks by name with their parameter checks, and the evaluation stages
they run as (tests of an attack added to the registry go here)."""

from __future__ import annotations

import numpy as np
import pytest

# --- attacks by name --------------------------------------------------------------------------


def test_factory_builds_every_named_art_attack():
    from art.attacks.evasion import (
        AutoAttack,
        AutoProjectedGradientDescent,
        FastGradientMethod,
        ProjectedGradientDescent,
        SquareAttack,
    )

    from robustlab.attacks import ATTACK_NAMES, make_attack, make_classifier
    from robustlab.attacks.registry import TargetedAPGD
    from robustlab.models import build_model

    clf = make_classifier(build_model("madry_cnn"))
    expected = {
        "fgsm": FastGradientMethod,
        "pgd": ProjectedGradientDescent,
        "apgd": AutoProjectedGradientDescent,
        "autoattack": AutoAttack,
        "square": SquareAttack,
        "apgd_t": TargetedAPGD,
    }
    assert set(ATTACK_NAMES) == set(expected)
    for name, cls in expected.items():
        assert isinstance(make_attack(name, clf, eps=0.3), cls), name
    pgd = make_attack("pgd", clf, eps=0.2, steps=7, step_size=0.05, restarts=3, batch_size=64)
    assert (pgd.max_iter, pgd.eps_step, pgd.num_random_init, pgd.batch_size) == (7, 0.05, 3, 64)
    assert pgd.norm == np.inf and pgd.eps == 0.2
    aa = make_attack("autoattack", clf, eps=0.3, square_queries=10)
    assert [type(a).__name__ for a in aa.attacks] == [
        "AutoProjectedGradientDescent",
        "AutoProjectedGradientDescent",
        "SquareAttack",
    ]
    assert [a.loss_type for a in aa.attacks[:2]] == ["cross_entropy", "difference_logits_ratio"]
    assert [a.estimator.loss_object.fn.__name__ for a in aa.attacks[:2]] == [
        "cross_entropy",
        "difference_logits_ratio",
    ]
    assert aa.attacks[2].max_iter == 10


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        (
            "cw",
            {"eps": 0.3},
            "unknown attack 'cw'; choose one of fgsm, pgd, apgd, autoattack, square, apgd_t",
        ),
        ("pgd", {"eps": 1.5}, "eps must lie in [0, 1]"),
        ("pgd", {"eps": -0.1}, "eps must lie in [0, 1]"),
        ("pgd", {"eps": 0.3, "steps": 0}, "steps must be >= 1"),
        ("pgd", {"eps": 0.3, "step_size": 0.0}, "step_size must be > 0"),
        ("pgd", {"eps": 0.3, "stepz": 3}, "unknown parameter(s) ['stepz']"),
        ("square", {"eps": 0.3, "restarts": 0}, "restarts must be >= 1"),
    ],
)
def test_factory_rejects_bad_input_with_one_line(name, kwargs, fragment):
    from robustlab.attacks import make_attack, make_classifier
    from robustlab.errors import ConfigError
    from robustlab.models import build_model

    clf = make_classifier(build_model("madry_cnn"))
    with pytest.raises(ConfigError) as info:
        make_attack(name, clf, **kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --- evaluation stages ------------------------------------------------------------------------


def test_stages_come_from_the_registry_in_order_with_their_own_seed_streams():
    from robustlab.attacks.registry import SEED_STREAMS, STAGES, StageSpec, build_stages
    from robustlab.config import EvalConfig

    spec = StageSpec(eps_grid=(0.0, 0.2, 0.4), square_queries=50)
    names = [s.name for s in build_stages(EvalConfig(pgd_restarts=2, pgd_steps=20), spec)]
    assert names == [
        "pgd40",
        "pgd20x2",
        "autoattack",
        "square",
        "curve@0",
        "curve@0.2",
        "curve@0.4",
    ]
    lean = EvalConfig(pgd_restarts=0, autoattack_size=0, square_alone=True)
    assert [s.name for s in build_stages(lean, spec)][:2] == ["pgd40", "curve@0"]
    assert len(set(SEED_STREAMS.values())) == len(SEED_STREAMS) == len(STAGES)


def test_an_unknown_optional_stage_is_one_line():
    from robustlab.attacks.registry import check_eval_config
    from robustlab.config import EvalConfig
    from robustlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown extra attack\(s\) \['cw'\]"):
        check_eval_config(EvalConfig(extra_attacks=("cw",)))


# --- APGD-T: an attack added through the registry alone ----------------------------------------


def test_apgd_t_is_an_optional_stage_that_evaluate_runs(tmp_path):
    import json

    from robustlab.attacks import make_attack, make_classifier
    from robustlab.attacks.registry import OPTIONAL_STAGES, TargetedAPGD
    from robustlab.commands.eval_args import summary_line
    from robustlab.config import EvalConfig
    from robustlab.data.mnist import subsample
    from robustlab.evaluation.robustness import evaluate_and_log
    from tests.test_attacks import trained_model

    model, test = trained_model()
    assert "apgd_t" in OPTIONAL_STAGES
    attack = make_attack("apgd_t", make_classifier(model), eps=0.3, steps=5, targets=2)
    assert isinstance(attack, TargetedAPGD) and attack.targets == 2
    small = subsample(test, 60, seed=2)
    cfg = EvalConfig(
        eps=0.3, autoattack_size=60, pgd_restarts=0, curve_size=10, extra_attacks=("apgd_t",)
    )
    metrics = evaluate_and_log(
        model,
        small,
        cfg,
        out_dir=tmp_path,
        log=False,
        eps_grid=(0.0, 0.3),
        square_queries=20,
        autoattack_steps=10,
    )
    assert metrics["test/apgd_t_acc"] <= metrics["test/pgd_subset_acc"]  # a worst case with PGD
    report = json.loads((tmp_path / "evaluation.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "apgd_t")
    assert stage["n_attacked"] == round(metrics["test/pgd_subset_acc"] * 60) > 0
    assert report["attacks"]["apgd_t"]["targets"] == 9
    assert "APGD-T" in summary_line(metrics, cfg)
    header = (tmp_path / "per_example.csv").read_text().splitlines()[0]
    assert "apgd_t" in header.split(",")
    without = evaluate_and_log(
        model,
        small,
        EvalConfig(eps=0.3, autoattack_size=60, pgd_restarts=0, curve_size=10),
        out_dir=tmp_path / "b",
        log=False,
        eps_grid=(0.0, 0.3),
        square_queries=20,
        autoattack_steps=10,
    )
    assert "test/apgd_t_acc" not in without  # optional: only when asked for


def test_apgd_t_targets_the_highest_other_logits_first(monkeypatch):
    from robustlab.attacks import registry
    from robustlab.errors import ConfigError

    class Fixed:  # an ART-like classifier whose logits rank 3, 7, 1, ... after the true 0
        def predict(self, x):
            logits = np.tile(np.arange(10.0)[::-1], (len(x), 1))
            logits[:, [0, 3, 7]] = [[30.0, 20.0, 10.0]]
            return logits

    targets = []

    class Recorder:
        def __init__(self, classifier, **kwargs):
            assert kwargs["targeted"] and kwargs["loss_type"] == "difference_logits_ratio"

        def generate(self, x, y):
            targets.append(list(y))
            return x  # breaks nothing: every target is tried

    monkeypatch.setattr(registry, "build_apgd", Recorder)
    attack = registry.TargetedAPGD(Fixed(), eps=0.3, targets=3, max_iter=5)
    attack.generate(np.zeros((2, 28, 28, 1), np.float32), [0, 0])
    assert targets == [[3, 3], [7, 7], [1, 1]]
    with pytest.raises(ConfigError, match="targets must lie in 1..9"):
        registry.TargetedAPGD(Fixed(), eps=0.3, targets=10)
