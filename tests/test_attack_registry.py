"""The attack registry: attacks by name with their parameter checks, the evaluation stages they
run as, and the readers of the registry (model card, docs). A new attack's own test goes in
tests/test_attack_<name>.py; APGD-T's are at the end of this file."""

from __future__ import annotations

import numpy as np
import pytest

# --- attacks by name --------------------------------------------------------------------------


def test_factory_builds_every_registered_attack():
    from robustlab.attacks import ATTACK_NAMES, make_attack, make_classifier
    from robustlab.models import build_model

    clf = make_classifier(build_model("madry_cnn"))
    assert {"pgd", "autoattack", "square"} <= set(ATTACK_NAMES)
    for name in ATTACK_NAMES:
        assert callable(make_attack(name, clf, eps=0.3).generate), name
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
        ("cw", {"eps": 0.3}, "unknown attack 'cw'; choose one of {names}"),
        ("pgd", {"eps": 1.5}, "eps must lie in [0, 1]"),
        ("pgd", {"eps": -0.1}, "eps must lie in [0, 1]"),
        ("pgd", {"eps": 0.3, "steps": 0}, "steps must be >= 1"),
        ("pgd", {"eps": 0.3, "step_size": 0.0}, "step_size must be > 0"),
        ("pgd", {"eps": 0.3, "stepz": 3}, "unknown parameter(s) ['stepz']"),
        ("square", {"eps": 0.3, "restarts": 0}, "restarts must be >= 1"),
        # checks are the attack's own: Square takes no step size, FGSM no steps
        ("square", {"eps": 0.3, "step_size": 0.1}, "unknown parameter(s) ['step_size']"),
        ("fgsm", {"eps": 0.3, "steps": 5}, "unknown parameter(s) ['steps']"),
        ("apgd", {"eps": 0.3, "loss_type": "hinge"}, "loss_type must be one of"),
        ("autoattack", {"eps": 0.3, "version": "plus"}, "version must be one of"),
    ],
)
def test_factory_rejects_bad_input_with_one_line(name, kwargs, fragment):
    from robustlab.attacks import ATTACK_NAMES, make_attack, make_classifier
    from robustlab.errors import ConfigError
    from robustlab.models import build_model

    clf = make_classifier(build_model("madry_cnn"))
    with pytest.raises(ConfigError) as info:
        make_attack(name, clf, **kwargs)
    assert fragment.format(names=", ".join(ATTACK_NAMES)) in str(info.value)
    assert "\n" not in str(info.value)


def test_the_registry_refuses_a_name_or_seed_stream_used_twice():
    from dataclasses import replace

    from robustlab.attacks.registry import ATTACKS, collect
    from robustlab.errors import ConfigError

    pgd = ATTACKS["pgd"]
    with pytest.raises(ConfigError, match="attack 'pgd' is registered twice"):
        collect([*ATTACKS.values(), pgd])
    with pytest.raises(ConfigError, match="stage 'pgd40' is registered twice"):
        collect([*ATTACKS.values(), replace(pgd, name="pgd2")])
    clash = replace(pgd.stages[0], name="other", seed_stream="other")  # pgd40's stream id, 1
    with pytest.raises(ConfigError, match="seed streams 'pgd40' and 'other' share id 1"):
        collect([*ATTACKS.values(), replace(pgd, name="pgd2", stages=(clash,))])


# --- evaluation stages ------------------------------------------------------------------------


def test_stages_come_from_the_registry_in_order():
    from robustlab.attacks.registry import OPTIONAL_STAGES, StageSpec, build_stages
    from robustlab.config import EvalConfig

    spec = StageSpec(eps_grid=(0.0, 0.2, 0.4), square_queries=50)
    names = [s.name for s in build_stages(EvalConfig(pgd_restarts=2, pgd_steps=20), spec)]
    assert names[:2] == ["pgd40", "pgd20x2"]  # the PGD chain first
    assert names[-3:] == ["curve@0", "curve@0.2", "curve@0.4"]  # the eps curve last
    assert {"autoattack", "square"} <= set(names) and not set(OPTIONAL_STAGES) & set(names)
    lean = EvalConfig(pgd_restarts=0, autoattack_size=0, square_alone=True)
    assert [s.name for s in build_stages(lean, spec)] == [
        "pgd40",
        "curve@0",
        "curve@0.2",
        "curve@0.4",
    ]
    every = EvalConfig(extra_attacks=OPTIONAL_STAGES)
    assert set(OPTIONAL_STAGES) <= {s.name for s in build_stages(every, spec)}


def test_seeds_of_the_existing_stages_are_unchanged():
    """Reproducibility stays bitwise: the stream ids of the stages that existed before the
    attack modules (the seeds of every evaluation since) are pinned; new streams derive theirs
    from the name with SHA-256 (stable across processes, unlike `hash`)."""
    from robustlab.attacks.registry import SEED_STREAMS, attack_seed
    from robustlab.attacks.stage import derived_stream_id

    legacy = {"pgd40": 1, "pgd100": 2, "curve": 3, "autoattack": 4, "square": 5, "apgd_t": 6}
    assert {k: SEED_STREAMS[k] for k in legacy} == legacy
    assert attack_seed(7, "pgd100", 3) == 4233973465  # SeedSequence([7, 2, 3]), as before
    assert derived_stream_id("cw_linf") == 271636576


def test_an_unknown_optional_stage_is_one_line():
    from robustlab.attacks.registry import check_eval_config
    from robustlab.config import EvalConfig
    from robustlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown extra attack\(s\) \['cw'\]"):
        check_eval_config(EvalConfig(extra_attacks=("cw",)))


def test_the_model_card_reads_its_attack_rows_from_the_registry():
    from robustlab.attacks.registry import STAGES
    from robustlab.config import EvalConfig
    from robustlab.register.card import figures_table

    cfg = EvalConfig(pgd_restarts=3, pgd_steps=40)
    carded = [e for e in STAGES.values() if e.card is not None and e.metric(cfg)]
    tags = {f"robustlab.{e.metric(cfg)}": "0.5" for e in carded}
    tags["robustlab.test/clean_acc"] = "0.99"
    table = figures_table(tags)
    rows = [r.split(" | ")[0].removeprefix("| ") for r in table[2:]]
    assert rows == ["clean accuracy", *(e.card(e.metric(cfg)) for e in carded)]
    assert "PGD-40x3 (restarts, worst case with PGD-40)" in rows


@pytest.mark.parametrize("doc", ["docs/evaluation.md", "README.md"])
def test_the_documented_attack_list_is_the_registrys(doc):
    from pathlib import Path

    from robustlab.attacks.registry import documented_list, markdown_list

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    listed = documented_list(text)
    if listed is None and doc == "README.md":
        pytest.skip("README has no generated attack list yet (the lead adds it)")
    assert listed == markdown_list(), (
        f"{doc}: run `python -m robustlab.attacks.registry --write-docs` (or paste its output)"
    )


# --- APGD-T: an attack added through the registry alone ----------------------------------------


def test_apgd_t_is_an_optional_stage_that_evaluate_runs(tmp_path):
    import json

    from robustlab.attacks import make_attack, make_classifier
    from robustlab.attacks.families.apgd_t import TargetedAPGD
    from robustlab.attacks.registry import OPTIONAL_STAGES
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
        EvalConfig(eps=0.3, autoattack_size=10, pgd_restarts=0, curve_size=10),
        out_dir=tmp_path / "b",
        log=False,
        eps_grid=(0.0, 0.3),
        square_queries=20,
        autoattack_steps=10,
    )
    assert "test/apgd_t_acc" not in without  # optional: only when asked for


def test_apgd_t_targets_the_highest_other_logits_first(monkeypatch):
    from robustlab.attacks.families import apgd_t
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

    monkeypatch.setattr(apgd_t, "build_apgd", Recorder)
    attack = apgd_t.TargetedAPGD(Fixed(), eps=0.3, targets=3, max_iter=5)
    attack.generate(np.zeros((2, 28, 28, 1), np.float32), [0, 0])
    assert targets == [[3, 3], [7, 7], [1, 1]]
    with pytest.raises(ConfigError, match="targets must lie in 1..9"):
        apgd_t.TargetedAPGD(Fixed(), eps=0.3, targets=10)
