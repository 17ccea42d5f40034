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
    from robustlab.models import build_model

    clf = make_classifier(build_model("madry_cnn"))
    expected = {
        "fgsm": FastGradientMethod,
        "pgd": ProjectedGradientDescent,
        "apgd": AutoProjectedGradientDescent,
        "autoattack": AutoAttack,
        "square": SquareAttack,
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
            "unknown attack 'cw'; choose one of fgsm, pgd, apgd, autoattack, square",
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
