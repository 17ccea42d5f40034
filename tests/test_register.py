"""`register`: the validation criterion, champion alias, refusal without force, version tags, test run."""

from __future__ import annotations

import json

# ART's import reconfigures logging and closes every existing handler's stream, absl's among
# them (bound to pytest's capture file once TensorFlow is imported): import it before TF.
import art  # noqa: F401
import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from robustlab.cli import main
from robustlab.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from robustlab.data.pools import load_inv_pools
from robustlab.data.tramer_halves import selection_sources, tramer_source_split
from robustlab.errors import ConfigError
from robustlab.evaluation.selection import Candidate, choose
from robustlab.provenance import VERSION_EXCLUDED_TAG, decode_indices, read_provenance
from robustlab.regimes import make_regime
from robustlab.register.publish import crown
from robustlab.train.runner import Extras, Judging, Placement, run_training

# optuna's default handler would bind to the stream of the first test that logs (capsys) and
# write to it after it is closed; let its records go through pytest's logging capture instead
optuna.logging.disable_default_handler()

NAME = "robustlab-mnist"
EVAL = [
    "--eval-size",
    "60",
    "--autoattack-size",
    "10",
    "--square-queries",
    "20",
    "--pgd-restarts",
    "1",
    "--batch-size",
    "60",
    "--curve-size",
    "20",
    "--curve-points",
    "3",
]
EVAL_NO_AA = [*EVAL[:2], "--autoattack-size", "0", *EVAL[4:]]


def _train(seed: int, epochs: int = 1, nested: bool = False, precision: str = "auto") -> str:
    """A really trained tiny vanilla model (256 images) logged by the runner; returns its run id."""
    cfg = RunConfig(
        data=DataConfig(None, 256, 100),
        train=TrainConfig(epochs=epochs, seed=seed, patience=0, precision=precision),
    ).validate()
    extras = Extras(
        run=Placement(nested=nested, run_name=f"tiny-{seed}"), judge=Judging(robust_eval=False)
    )
    return run_training(make_regime("vanilla", epochs=epochs), cfg, EvalConfig(), extras)


def _study(storage: str, name: str, runs: dict[str, dict[str, float]], floor: float):
    """A study as `tune` leaves it: user attrs, COMPLETE trials pointing at MLflow runs."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * 3)
    study.set_user_attr("clean_floor", floor)
    study.set_user_attr("objective", "pareto")
    dist = {"u_clean": optuna.distributions.FloatDistribution(0, 1)}
    for run_id, sel in runs.items():
        for key, value in sel.items():
            MlflowClient().log_metric(run_id, key, value)
        study.add_trial(
            optuna.trial.create_trial(
                params={"u_clean": 0.5},
                distributions=dist,
                values=[sel["sel/clean_acc"], sel["sel/pgd_acc"], sel["sel/inv_bal_acc"]],
                user_attrs={"mlflow_run_id": run_id},
            )
        )
    study.add_trial(
        optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={})
    )
    return study


def _sel(clean: float, pgd: float, inv_bal: float) -> dict[str, float]:
    return {
        "sel/clean_acc": clean,
        "sel/pgd_acc": pgd,
        "sel/inv_bal_acc": inv_bal,
        "sel/inv_acc": 0.9,
    }


def _versions() -> list:
    try:
        return list(MlflowClient().search_model_versions(f"name='{NAME}'"))
    except Exception:  # noqa: BLE001
        return []


def _all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _refused(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("robustlab register: error:") and fragment in last, err[-2000:]
    assert "Traceback" not in err


def test_criterion_prefers_the_weaker_robustness_maximum_and_respects_the_floor():
    def cand(name, clean, pgd, inv_bal):
        return Candidate(name, f"runs:/{name}/model", _sel(clean, pgd, inv_bal))

    found = [
        cand("lopsided", 0.99, 0.95, 0.30),  # min 0.30
        cand("balanced", 0.96, 0.60, 0.55),  # min 0.55
        cand("tie_cleaner", 0.98, 0.55, 0.70),  # min 0.55, cleaner: wins the tie
        cand("infeasible", 0.70, 0.90, 0.90),  # below the floor
    ]
    assert choose(found, 0.95, "s").run_id == "tie_cleaner"
    assert choose(found, 0.5, "s").run_id == "infeasible"
    with pytest.raises(Exception, match="clean floor"):
        choose(found, 0.995, "s")
    with pytest.raises(Exception, match="no finished model"):
        choose([], 0.5, "s")


@pytest.mark.slow
def test_register_from_a_study_alias_refusal_force_and_tags(tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    a, b, c = _train(1), _train(2), _train(3)
    _study(
        storage,
        "s1",
        {
            a: _sel(0.90, 0.50, 0.60),  # criterion 0.50: the best feasible
            b: _sel(0.97, 0.70, 0.40),  # 0.40
            c: _sel(0.50, 0.90, 0.90),  # infeasible (floor 0.8)
        },
        floor=0.8,
    )
    _study(storage, "s2", {b: _sel(0.97, 0.70, 0.40)}, floor=0.8)
    optuna.create_study(study_name="empty", storage=storage).set_user_attr("clean_floor", 0.5)
    base = ["register", "--storage", storage]

    assert main([*base, "--study-name", "s1", *EVAL]) == 0, capsys.readouterr().err[-3000:]
    client = MlflowClient()
    [v1] = _versions()
    assert (
        v1.run_id == a and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    )
    t = v1.tags
    assert float(t["robustlab.criterion"]) == pytest.approx(0.5)
    assert float(t["robustlab.sel/inv_bal_acc"]) == pytest.approx(0.6)
    assert t["robustlab.study"] == "s1" and t["robustlab.trial"] == "0"
    assert t["robustlab.source_run_id"] == a and t["robustlab.clean_floor"] == "0.8"
    assert t["robustlab.data_digest"] == client.get_run(a).data.tags["robustlab.mnist_digest"]
    # exclusions: the model's own plus every selection source (Tramèr selection half, thesis pool)
    excluded = set(decode_indices(t[VERSION_EXCLUDED_TAG]).tolist())
    sel_half, test_half = tramer_source_split(None)
    assert set(sel_half.tolist()) <= excluded and not set(test_half.tolist()) & excluded
    assert set(selection_sources(None, load_inv_pools(None)).tolist()) == excluded
    assert set(read_provenance(f"models:/{NAME}@champion").excluded.tolist()) == excluded
    # the strong test evaluation ran in its own finished run, and its results are on the version
    test_run = client.get_run(t["robustlab.test_run_id"])
    assert test_run.info.status == "FINISHED" and test_run.info.run_id not in (a, b, c)
    m = test_run.data.metrics
    assert float(t["robustlab.test/clean_acc"]) == pytest.approx(m["test/clean_acc"], rel=1e-5)
    assert {"test/pgd40_acc", "test/autoattack_acc", "test/inv_bal_acc", "test/inv_acc"} <= set(m)
    # the human-labelled examples none of its training or selection sources touched: the
    # selection set's sources (thesis validation split, Tramèr's selection half) are left out
    from robustlab.data.folds import load_human_pool

    untouched = m["test/human_pool_n_changed"] + m["test/human_pool_n_kept"]
    touched = np.isin(load_human_pool(None).source, sorted(excluded))
    assert touched.any() and untouched == (~touched).sum() and "test/human_pool_bal_acc" in m
    assert m["test/n_inv_changed"] > 0 and m["test/n_inv_kept"] > 0
    path = mlflow.artifacts.download_artifacts(
        run_id=test_run.info.run_id, artifact_path="excluded_test_indices.json"
    )
    with open(path) as f:
        assert set(json.load(f)["indices"]) == excluded
    assert test_run.data.params["n_excluded_sources"] == str(len(excluded))
    # the model card: the version's description, what a person reads in the registry
    card = client.get_model_version(NAME, "1").description
    assert card.startswith(f"# {NAME} version 1") and f"{len(excluded)} MNIST test images" in card
    assert f"| clean accuracy | {m['test/clean_acc']:.4f} |" in card
    assert "min(sel/pgd_acc, sel/inv_bal_acc)" in card and "mlflow models serve" in card
    assert "| human-labelled invariance examples, balanced |" in card
    n_runs = len(_all_runs())

    # the same source run again: no second version, no new evaluation
    assert main([*base, "--study-name", "s1", *EVAL]) == 0
    assert len(_versions()) == 1 and len(_all_runs()) == n_runs

    # a worse model does not take the alias without force; nothing is written
    assert main([*base, "--study-name", "s2", *EVAL_NO_AA]) == 2
    _refused(capsys, "force=true")
    assert len(_versions()) == 1 and len(_all_runs()) == n_runs
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # with force it does
    assert main([*base, "--study-name", "s2", "--force", *EVAL_NO_AA]) == 0
    v2 = client.get_model_version_by_alias(NAME, "champion")
    assert str(v2.version) == "2" and v2.run_id == b and len(_versions()) == 2

    # a later evaluation through the alias is tagged on the version and added to its card
    assert main(["evaluate", "--model-uri", f"models:/{NAME}@champion", *EVAL_NO_AA]) == 0
    v2 = client.get_model_version(NAME, "2")
    ev_run = v2.tags["robustlab.last_evaluation_run_id"]
    assert client.get_run(ev_run).data.tags["robustlab.registered_version"] == "2"
    assert "## Later evaluations" in v2.description and ev_run in v2.description

    # bad input: one line, nothing created
    n_runs = len(_all_runs())
    for argv, fragment in (
        (["--study-name", "empty"], "no finished model"),
        (["--study-name", "nope"], "unknown study"),
        (["--model-uri", f"models:/{NAME}@nope"], "not found"),
        (["--model-uri", "models:/no-such-model/1"], "not found"),
        (["--experiment-run-id", "0123456789abcdef"], "no such run"),
        (["--study-name", "s1", "--experiment-run-id", a], "exactly one"),
    ):
        assert main([*base, *argv, *EVAL_NO_AA]) == 2, argv
        _refused(capsys, fragment)
    assert (
        main(["register", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--study-name", "s1"])
        == 2
    )
    _refused(capsys, "no Optuna storage")
    assert not (tmp_path / "none.db").exists()
    assert len(_versions()) == 2 and len(_all_runs()) == n_runs

    # a version made without robustlab (plain mlflow.register_model: no exclusions, no test
    # evaluation) is never reused or made champion: register makes a new, evaluated version
    plain = mlflow.register_model(f"runs:/{c}/model", NAME)
    assert (
        main(
            [*base, "--model-uri", f"runs:/{c}/model", "--clean-floor", "0", "--force", *EVAL_NO_AA]
        )
        == 0
    )
    assert "has no robustlab provenance" in capsys.readouterr().err
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == c and champion.version != plain.version
    assert VERSION_EXCLUDED_TAG in champion.tags and "robustlab.test_run_id" in champion.tags

    # a version registered while a better champion was crowned beside it (the race `crown`
    # re-checks for) keeps its registration and says so, without the alias
    weaker = Candidate(a, f"runs:/{a}/model", _sel(0.0, 0.0, 0.0))  # criterion -0.8
    with pytest.raises(ConfigError) as refused:
        crown(client, NAME, "1", weaker, force=False, floor=0.8)
    assert "version 1 stays registered, not champion" in str(refused.value)
    assert "nothing registered" not in str(refused.value)
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version


@pytest.mark.slow
def test_register_from_an_experiment_parent_scores_children_on_validation(tracking, capsys):
    from robustlab.tracking import start_run

    with start_run("experiment", system_metrics=False) as parent:
        untrained = _train(4, epochs=0, nested=True)  # chance-level: below any sensible floor
        # float32: validation during training runs in the training precision, and register
        # scores the logged float32 model, so only a float32 run logs the very same number
        trained = _train(5, epochs=1, nested=True, precision="float32")
    pid = parent.info.run_id
    argv = ["register", "--experiment-run-id", pid, "--clean-floor", "0.5", "--eps", "0.1"]
    assert main([*argv, *EVAL_NO_AA]) == 0, capsys.readouterr().err[-3000:]
    [v] = _versions()
    assert v.run_id == trained and v.run_id != untrained
    # sel/clean_acc is the validation split's accuracy: the runner logged the same number
    val_clean = MlflowClient().get_run(trained).data.metrics["val/clean_acc"]
    assert float(v.tags["robustlab.sel/clean_acc"]) == pytest.approx(val_clean, abs=1e-4)
    assert 0.0 <= float(v.tags["robustlab.sel/inv_bal_acc"]) <= 1.0
    assert "robustlab.study" not in v.tags and v.tags["robustlab.eval_eps"] == "0.1"
    test_run = MlflowClient().get_run(v.tags["robustlab.test_run_id"])
    assert test_run.data.params["eps"] == "0.1" and "test/inv_bal_acc" in test_run.data.metrics
    assert np.isfinite(test_run.data.metrics["test/pgd40_acc"])


@pytest.mark.slow
def test_chain_smoke_study_register_evaluate_through_alias_and_serve(tracking, tmp_path, capsys):
    """What CI runs end to end: a two-worker smoke study (>= 3 tiny trials) -> register ->
    evaluate through models:/robustlab-mnist@champion with exclusions intact -> serve."""
    from robustlab.config import TuneConfig
    from robustlab.tune.run import run_tune
    from tests.conftest import DATA_DIR
    from tests.test_serve import serve_and_predict

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = TuneConfig(
        storage=storage,
        budget="smoke",
        data_dir=str(DATA_DIR),
        clean_floor=0.0,
        workers=2,
        n_trials=3,
        study_name="chain",
    )
    run_tune(cfg)
    study = optuna.load_study(study_name="chain", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 3

    assert main(["register", "--study-name", "chain", "--storage", storage, *EVAL_NO_AA]) == 0
    champion = MlflowClient().get_model_version_by_alias(NAME, "champion")
    trial_runs = {t.user_attrs["mlflow_run_id"]: t for t in done}
    assert champion.run_id in trial_runs
    chosen = trial_runs[champion.run_id]
    best = max(done, key=lambda t: (min(t.values[1], t.values[2]), t.values[0]))
    assert min(chosen.values[1], chosen.values[2]) == pytest.approx(min(best.values[1:]))
    assert champion.tags["robustlab.trial"] == str(chosen.number)

    uri = f"models:/{NAME}@champion"
    excluded = set(decode_indices(champion.tags[VERSION_EXCLUDED_TAG]).tolist())
    assert set(read_provenance(uri).excluded.tolist()) == excluded
    capsys.readouterr()
    assert main(["evaluate", "--model-uri", uri, *EVAL_NO_AA[:2], "--autoattack-size", "0"]) == 0
    [ev] = [r for r in _all_runs() if r.data.tags.get("robustlab.model_uri") == uri]
    assert ev.data.params["n_excluded_sources"] == str(len(excluded))
    sel_half, _ = tramer_source_split(DATA_DIR)
    assert set(sel_half.tolist()) <= excluded

    from robustlab.data.mnist import load_mnist

    x = load_mnist().test.x[:4]
    expected = np.asarray(mlflow.pyfunc.load_model(uri).predict(x))
    np.testing.assert_allclose(serve_and_predict(uri, x, tracking, tmp_path), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("params", "shown", "absent"),
    [
        ({"method": "pgd", "trades_beta": "6.0"}, "method `pgd`,", "TRADES β"),
        ({"method": "trades", "trades_beta": "3.0"}, "method `trades` (TRADES β 3.0)", "β 6"),
        (
            {"model": "small_cnn", "method": "trades", "trades_beta": "6"},
            "`small_cnn` (TRADES'",
            "5×5",
        ),
    ],
)
def test_model_card_names_trades_beta_only_for_trades_and_the_model_trained(params, shown, absent):
    from robustlab.register.card import model_card

    card = model_card(NAME, "1", {}, {"regime": "perturbation", **params}, {}, 0)
    assert shown in card and absent not in card
