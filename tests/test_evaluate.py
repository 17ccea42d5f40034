"""Robustness evaluation: metrics, intervals and artifacts in a real MLflow store; masking flags; CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_attacks import trained_model  # the same cached model (trained once per process)

from robustlab.config import EvalConfig
from robustlab.data.mnist import subsample


@pytest.fixture(scope="module")
def model_and_test():
    return trained_model()


def _check_interval(metrics: dict[str, float], name: str) -> None:
    lo, value, hi = metrics[f"{name}_ci_low"], metrics[name], metrics[f"{name}_ci_high"]
    assert 0.0 <= lo <= value <= hi <= 1.0, (name, lo, value, hi)
    assert hi - lo > 0.0


def test_evaluate_and_log_records_metrics_intervals_and_artifacts(
    model_and_test, tracking, tmp_path
):
    import mlflow

    from robustlab.evaluation.robustness import MASKING_TAG, evaluate_and_log
    from robustlab.tracking import start_run

    model, test = model_and_test
    test = subsample(test, 120, seed=1)
    cfg = EvalConfig(eps=0.1, autoattack_size=30, pgd_restarts=2, seed=0, batch_size=120)
    with start_run("eval-test", system_metrics=False) as run:
        metrics = evaluate_and_log(
            model,
            test,
            cfg,
            out_dir=tmp_path / "out",
            eps_grid=(0.0, 0.1, 0.2),
            curve_size=40,
            square_queries=30,
            autoattack_steps=10,
        )
    names = [
        "test/clean_acc",
        "test/pgd40_acc",
        "test/pgd100x2_acc",
        "test/autoattack_acc",
        "test/square_acc",
    ]
    for name in names:
        _check_interval(metrics, name)
    clean, pgd40, pgd100 = (
        metrics["test/clean_acc"],
        metrics["test/pgd40_acc"],
        metrics["test/pgd100x2_acc"],
    )
    assert clean > 0.85
    assert pgd100 < clean and pgd40 < clean  # the attacks break some examples
    assert pgd40 > 0.3  # this model is partly robust at eps 0.1
    assert metrics["test/n_eval"] == 120

    # what landed in the store
    stored = mlflow.get_run(run.info.run_id)
    for name in names:
        assert stored.data.metrics[name] == pytest.approx(metrics[name])
        assert f"{name}_ci_low" in stored.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "test/pgd_curve_acc")
    assert sorted(m.step for m in history) == [0, 10, 20]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {
        "evaluation.json",
        "evaluation.md",
        "eps_curve.png",
        "adversarial_examples.png",
        "evaluated_test_indices.json",
    } <= artifacts
    evaluated = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluated_test_indices.json")
    assert evaluated == {"mnist_split": "test", "indices": test.source_index.tolist()}
    assert MASKING_TAG not in stored.data.tags  # an honestly trained model: no masking warning

    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation.json"
    )
    with open(path) as f:
        report = json.load(f)
    assert report["eps"] == 0.1 and report["n_eval"] == 120 and report["n_autoattack"] == 30
    assert report["metrics"]["test/pgd40_acc"] == pytest.approx(pgd40)
    assert report["accuracies"]["test/clean_acc"]["n"] == 120
    assert report["curve"]["eps"] == [0.0, 0.1, 0.2]
    assert report["curve"]["acc"][0] >= report["curve"]["acc"][1] >= report["curve"]["acc"][2]
    assert report["gradient_masking"] is False and report["warnings"] == []
    assert report["attacks"]["autoattack"]["attacks"] == ["APGD-CE", "APGD-DLR", "Square"]
    assert set(report["seconds"]) >= {
        "clean",
        "pgd40",
        "pgd100x2",
        "autoattack",
        "square",
        "curve",
        "total",
    }
    stages = {s["name"]: s for s in report["stages"]}
    assert {"pgd40", "pgd100x2", "autoattack", "square"} <= set(stages)
    # AutoAttack and Square each attack what the PGD chain left standing on their subset
    n_pgd_survivors = round(metrics["test/pgd_subset_acc"] * 30)
    assert stages["autoattack"]["n_attacked"] == stages["square"]["n_attacked"] == n_pgd_survivors
    assert n_pgd_survivors > 0  # the subset stages had work to do
    assert all(s["peak_rss_mb"] > 100 for s in stages.values())  # this process's peak, in MiB
    summary = (tmp_path / "out" / "evaluation.md").read_text()
    assert "test/pgd100x2_acc" in summary and "No sign of gradient masking" in summary


def test_autoattack_size_zero_skips_autoattack_and_square(model_and_test, tmp_path):
    from robustlab.evaluation.robustness import evaluate_and_log

    model, test = model_and_test
    test = subsample(test, 50, seed=2)
    cfg = EvalConfig(eps=0.1, autoattack_size=0, pgd_restarts=1, batch_size=50)
    metrics = evaluate_and_log(
        model, test, cfg, out_dir=tmp_path, log=False, eps_grid=(0.0, 0.1), curve_size=30
    )
    assert "test/autoattack_acc" not in metrics and "test/square_acc" not in metrics
    assert {"test/clean_acc", "test/pgd40_acc", "test/pgd100x1_acc"} <= set(metrics)
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["n_autoattack"] == 0 and report["curve"]["n"] == 30


def test_robustlab_pgd_engine_matches_art_and_zero_restarts_skip_pgd100(model_and_test, tmp_path):
    from robustlab.evaluation.robustness import evaluate_and_log

    model, test = model_and_test
    test = subsample(test, 200, seed=3)
    results = {}
    for engine in ("art", "robustlab"):
        cfg = EvalConfig(
            eps=0.1, autoattack_size=0, pgd_restarts=0, batch_size=100, pgd_engine=engine
        )
        out = tmp_path / engine
        results[engine] = evaluate_and_log(
            model, test, cfg, out_dir=out, log=False, eps_grid=(0.0, 0.1), curve_size=50
        )
        assert not any(k.startswith("test/pgd100") for k in results[engine])
        report = json.loads((out / "evaluation.json").read_text())
        assert report["pgd_engine"] == engine and report["pgd_restarts"] == 0
    art, ours = results["art"]["test/pgd40_acc"], results["robustlab"]["test/pgd40_acc"]
    assert 0.2 < art < results["art"]["test/clean_acc"]  # a partly robust model, so the check bites
    assert abs(art - ours) <= 0.02  # same attack, different random starts


class _Spy:
    """Records (attacked images, adversarials) of every PGD call evaluate makes, then calls it."""

    def __init__(self):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def wrap_pgd_attack(self, real):
        def pgd_attack(model, x, y, **kw):
            adv = real(model, x, y, **kw)
            self.calls.append((np.array(x), np.array(adv)))
            return adv

        return pgd_attack

    def wrap_make_attack(self, real):
        def make_attack(name, classifier, **kw):
            attack = real(name, classifier, **kw)
            generate = attack.generate

            def recorded(x, y=None, **kwargs):
                adv = generate(x, y, **kwargs)
                self.calls.append((np.array(x), np.array(adv)))
                return adv

            attack.generate = recorded
            return attack

        return make_attack


@pytest.mark.parametrize("engine", ["robustlab", "art"])
def test_pgd_restarts_draw_independent_starts_and_break_more(model_and_test, monkeypatch, engine):
    """Issue 12.3: each restart starts from its own random point, so restarts find adversarials
    that one restart misses (a restart repeating the same start could not)."""
    from robustlab.attacks import make_classifier
    from robustlab.evaluation import robustness, stages

    model, test = model_and_test
    test = subsample(test, 150, seed=5)
    spy = _Spy()
    monkeypatch.setattr(stages, "pgd_attack", spy.wrap_pgd_attack(stages.pgd_attack))
    monkeypatch.setattr(stages, "make_attack", spy.wrap_make_attack(stages.make_attack))
    clean_ok = model.predict(test.x, verbose=0).argmax(1) == test.y
    history = robustness.pgd_restarts(
        model,
        make_classifier(model),
        test.x,
        test.y,
        clean_ok,
        restarts=3,
        eps=0.3,
        steps=20,
        batch_size=150,
        engine=engine,
        seed=0,
    )
    survivors = [int(h.sum()) for h in history]
    assert survivors[0] > 0  # a partly robust model: there is something left to break
    assert survivors[-1] < survivors[0], survivors  # later restarts break what the first missed
    # every example attacked by all three restarts got three different adversarials
    assert len(spy.calls) == 3
    per_restart = [
        {x.tobytes(): a for x, a in zip(xs, advs, strict=True)} for xs, advs in spy.calls
    ]
    common = set(per_restart[0]).intersection(*per_restart[1:])
    assert len(common) == survivors[1] > 0
    for i in range(3):
        for j in range(i + 1, 3):
            same = [np.array_equal(per_restart[i][k], per_restart[j][k]) for k in common]
            assert not any(same), (engine, i, j, sum(same))


def _split_like(test, **changes):
    from dataclasses import replace

    return replace(subsample(test, 20, seed=4), **changes)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda s: {"x": s.x.astype(np.float64)}, "float32"),
        (lambda s: {"x": s.x[..., 0]}, "(N, 28, 28, 1)"),
        (lambda s: {"x": s.x * 255.0}, "divide by 255"),
        (lambda s: {"x": np.where(s.x > 0.5, np.nan, s.x).astype(np.float32)}, "NaN"),
        (lambda s: {"y": s.y + 1}, "labels must lie in 0..9"),
        (lambda s: {"y": s.y.astype(np.float32)}, "integer labels"),
        (lambda s: {"y": s.y[:-1]}, "expected 20 labels"),
    ],
)
def test_evaluate_and_log_refuses_bad_inputs(model_and_test, tmp_path, change, fragment):
    from robustlab.errors import DataError
    from robustlab.evaluation.robustness import evaluate_and_log

    model, test = model_and_test
    base = subsample(test, 20, seed=4)
    bad = _split_like(test, **change(base))
    with pytest.raises(DataError) as info:
        evaluate_and_log(model, bad, EvalConfig(autoattack_size=0), out_dir=tmp_path, log=False)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before any attack ran or any file was written


def test_models_that_output_probabilities_are_refused_at_every_attack_boundary(
    model_and_test, tmp_path
):
    import keras

    from robustlab.attacks import make_classifier, pgd_attack
    from robustlab.errors import ConfigError
    from robustlab.evaluation.robustness import evaluate_and_log

    model, test = model_and_test
    softmax = keras.Sequential([model, keras.layers.Softmax()])
    small = subsample(test, 20, seed=4)
    calls = {
        "make_classifier": lambda: make_classifier(softmax),
        "pgd_attack": lambda: pgd_attack(
            softmax, small.x, small.y, eps=0.1, steps=2, step_size=0.05
        ),
        "evaluate_and_log": lambda: evaluate_and_log(
            softmax, small, EvalConfig(autoattack_size=0), out_dir=tmp_path, log=False
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError, match="outputs probabilities") as info:
            call()
        assert "\n" not in str(info.value), name
    make_classifier(model)  # the same network's logits are accepted


def test_unknown_pgd_engine_is_refused():
    from robustlab.errors import ConfigError

    with pytest.raises(ConfigError, match="pgd_engine"):
        EvalConfig(pgd_engine="foolbox").validate()


@pytest.mark.parametrize(
    ("pgd", "aa", "square", "curve", "expected"),
    [
        (0.80, 0.79, 0.85, [0.98, 0.9, 0.8], []),
        (0.80, 0.60, 0.85, [0.98, 0.9, 0.8], ["AutoAttack accuracy 0.600"]),
        (
            0.80,
            0.70,
            0.40,
            [0.98, 0.9, 0.8],
            ["AutoAttack accuracy 0.700", "Square accuracy 0.400"],
        ),
        (0.80, None, None, [0.98, 0.5, 0.6], ["rises with eps: 0.500 at 0.1 -> 0.600 at 0.2"]),
        (0.80, None, None, [0.98, 0.5, 0.51], []),  # within sampling tolerance
    ],
)
def test_gradient_masking_rules(pgd, aa, square, curve, expected):
    from robustlab.evaluation.robustness import gradient_masking_warnings

    checks = [(n, a, pgd) for n, a in (("AutoAttack", aa), ("Square", square)) if a is not None]
    got = gradient_masking_warnings(checks, [0.0, 0.1, 0.2], curve)
    assert len(got) == len(expected)
    for message, fragment in zip(got, expected, strict=True):
        assert fragment in message


def test_masked_gradients_are_flagged_on_the_run(model_and_test, tracking, tmp_path):
    """A model whose input gradient is zero fools PGD but not Square: the run gets the warning tag."""
    import keras
    import mlflow
    import tensorflow as tf

    from robustlab.evaluation.robustness import MASKING_TAG, evaluate_and_log
    from robustlab.tracking import start_run

    model, test = model_and_test

    class Masked(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=False):
            return self.inner(tf.stop_gradient(x) + 0.0 * x, training=training)  # d/dx == 0

    masked = Masked(model)
    test = subsample(test, 40, seed=3)
    cfg = EvalConfig(eps=0.3, autoattack_size=40, pgd_restarts=1, batch_size=40)
    with start_run("masked", system_metrics=False) as run:
        metrics = evaluate_and_log(
            masked,
            test,
            cfg,
            out_dir=tmp_path,
            eps_grid=(0.0, 0.3),
            curve_size=10,
            square_queries=100,
            autoattack_steps=5,
        )
    assert metrics["test/square_acc"] < metrics["test/pgd_subset_acc"] - 0.05
    tag = mlflow.get_run(run.info.run_id).data.tags.get(MASKING_TAG, "")
    assert "Square accuracy" in tag


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--eps", "2"], "eps must lie in [0, 1]"),
        (["--pgd-restarts", "-1"], "pgd_restarts must be >= 0"),
        (["--pgd-engine", "foolbox"], "pgd_engine must be one of"),
        (["--eval-size", "-5"], "must be >= 0"),
    ],
)
def test_cli_rejects_bad_input_before_creating_a_run(tracking, capsys, argv, fragment):
    from mlflow.tracking import MlflowClient

    from robustlab.cli import main

    rc = main(["evaluate", "--model-uri", "runs:/0123456789abcdef/model", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("robustlab evaluate: error:") and fragment in err
    assert "\n" not in err
    experiments = MlflowClient(tracking_uri=tracking).search_experiments()
    runs = MlflowClient(tracking_uri=tracking).search_runs([e.experiment_id for e in experiments])
    assert runs == []


def test_cli_evaluates_a_logged_model_minus_its_excluded_sources(model_and_test, tracking, capsys):
    import mlflow

    from robustlab.cli import main
    from robustlab.provenance import log_excluded_sources
    from robustlab.tracking import start_run

    model, _ = model_and_test
    with start_run("train", system_metrics=False) as train_run:
        mlflow.keras.log_model(model, name="model")
        log_excluded_sources(np.arange(0, 9990))  # leaves exactly 10 test images
    uri = f"runs:/{train_run.info.run_id}/model"
    rc = main(
        [
            "evaluate",
            "--model-uri",
            uri,
            "--autoattack-size",
            "0",
            "--eps",
            "0.1",
            "--pgd-restarts",
            "1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    client = mlflow.MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(exp_ids) if r.data.tags.get("robustlab.model_uri") == uri]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["n_eval"] == "10" and run.data.params["n_excluded_sources"] == "9990"
    assert run.data.metrics["test/n_eval"] == 10
    assert run.info.status == "FINISHED"


def test_a_shared_test_set_holding_an_excluded_source_is_refused_before_the_run(tracking):
    """Issue 12.4: the runner fails closed when given test indices it must not evaluate on."""
    from mlflow.tracking import MlflowClient

    from robustlab.errors import RobustlabError
    from robustlab.experiment.budgets import BUDGETS, regime_for
    from robustlab.experiment.plan import pair_configs, shared_test_indices
    from robustlab.train.runner import Extras, InvData, Judging, Watch, run_training

    shared = shared_test_indices(200, None)
    assert len(shared) == len(set(shared)) == 200 and min(shared) >= 0 and max(shared) < 10_000
    assert shared == shared_test_indices(200, None)  # fixed per experiment
    assert 0 not in shared  # test image 0 is a source of the thesis pool
    b = BUDGETS["smoke"]
    regime, source = regime_for("invariance", b)
    cfg, ev = pair_configs(b, 0, None, 0.3)
    for bad, fragment in (
        ((shared[0], 0), "would leak"),  # test[0] is a source of the thesis pool
        ((shared[0], shared[0]), "repeated"),
        ((shared[0], 10_000), "not in the MNIST test split"),
    ):
        extras = Extras(
            inv=InvData(label_source=source),
            watch=Watch(all_curves=True),
            judge=Judging(test_indices=bad),
        )
        with pytest.raises(RobustlabError, match=fragment):
            run_training(regime, cfg, ev, extras)
    client = MlflowClient(tracking_uri=tracking)
    experiments = client.search_experiments()
    assert client.search_runs([e.experiment_id for e in experiments]) == []


def test_each_stage_is_logged_as_it_ends_and_survives_a_stopped_evaluation(
    model_and_test, tracking, tmp_path
):
    """Every stage's figure (with its interval) reaches the run as the stage ends and equals the
    final figure; an evaluation stopped after its first attack stage keeps that stage's number."""
    import mlflow

    from robustlab.evaluation.robustness import evaluate_and_log
    from robustlab.tracking import start_run

    model, test = model_and_test
    test = subsample(test, 80, seed=4)
    cfg = EvalConfig(eps=0.1, autoattack_size=20, pgd_restarts=1, batch_size=80)
    small = dict(eps_grid=(0.0, 0.1), curve_size=20, square_queries=20, autoattack_steps=5)
    seen: dict[str, dict[str, float]] = {}
    metrics = evaluate_and_log(
        model,
        test,
        cfg,
        out_dir=tmp_path / "full",
        log=False,
        on_stage=lambda name, figures, step: seen.setdefault(name, figures),
        **small,
    )
    assert list(seen)[:5] == ["clean", "pgd40", "pgd100x1", "autoattack", "square"]
    staged = {
        k: v for name, f in seen.items() if not name.startswith("curve") for k, v in f.items()
    }
    assert staged == {k: pytest.approx(metrics[k]) for k in staged}
    assert {"test/pgd40_acc_ci_low", "test/pgd_subset_acc", "test/square_acc_ci_high"} <= set(
        staged
    )

    class Stopped(Exception):
        pass

    def stop_after_pgd40(name, figures, step):
        if name == "pgd40":
            raise Stopped

    with pytest.raises(Stopped), start_run("stopped", system_metrics=False) as run:
        evaluate_and_log(
            model, test, cfg, out_dir=tmp_path / "stopped", on_stage=stop_after_pgd40, **small
        )
    stored = mlflow.get_run(run.info.run_id).data.metrics
    for name in ("test/clean_acc", "test/pgd40_acc"):
        for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
            assert stored[key] == pytest.approx(metrics[key]), key
    assert "test/autoattack_acc" not in stored and "test/n_eval" not in stored
