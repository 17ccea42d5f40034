"""Provenance travels with the logged model: exclusions through every URI form, fail-closed."""

from __future__ import annotations

import json

# ART's import reconfigures logging and closes every existing handler's stream, absl's among
# them (bound to pytest's capture file once TensorFlow is imported): import it before TF.
import art  # noqa: F401
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from robustlab.cli import main
from robustlab.provenance import METADATA_KEY, read_provenance
from robustlab.tracking import ensure_experiment

TINY = ["--epochs", "1", "--train-size", "512", "--eval-size", "100", "--robust-eval", "false"]
EVAL_FAST = ["--eval-size", "30", "--autoattack-size", "0", "--pgd-restarts", "1", "--eps", "0.1"]


def _runs() -> list:
    client = MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, order_by=["attributes.start_time ASC"]) if exp_ids else []


def _train(argv: list[str], capsys) -> str:
    before = {r.info.run_id for r in _runs()}
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err[-2000:]
    [new] = [
        r
        for r in _runs()
        if r.info.run_id not in before and not r.data.tags.get("mlflow.parentRunId")
    ]
    return new.info.run_id


def _excluded_artifact(run_id: str) -> set[int]:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="excluded_test_indices.json"
    )
    with open(path) as f:
        return set(json.load(f)["indices"])


def _refused(capsys, command: str, fragment: str | tuple[str, ...]) -> None:
    """The command's one error line ends stderr (MLflow's own log lines may precede it) and
    holds `fragment` (or one of them)."""
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert last.startswith(f"robustlab {command}: error:"), err[-2000:]
    assert any(f in last for f in fragments), err[-2000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_exclusions_travel_through_every_uri_and_init_model(tracking, capsys, tmp_path):
    run_id = _train(["invariance", *TINY, "--seed", "3"], capsys)
    excluded = _excluded_artifact(run_id)
    assert len(excluded) == 493  # the thesis pool's sources, minus 7 rater ties

    # a real MLflow 3 LoggedModel of the run, with a float32 NHWC tensor signature
    client = MlflowClient()
    [logged] = mlflow.search_logged_models(
        experiment_ids=[ensure_experiment()], output_format="list"
    )
    assert logged.source_run_id == run_id and logged.name == "model"
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.model_id == logged.model_id
    [spec] = info.signature.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 28, 28, 1)
    meta = info.metadata[METADATA_KEY]
    run = client.get_run(run_id)
    assert meta["run_id"] == run_id and meta["regime"] == "invariance"
    assert meta["seed"] == 3 and meta["eps"] == pytest.approx(0.3)
    assert meta["mix"]["inv"] == pytest.approx(0.25) and meta["precision"] == "float32"
    assert meta["data_digest"] == run.data.tags["robustlab.mnist_digest"]
    assert set(meta["excluded_test_indices"]) == excluded and meta["excluded_complete"]

    # pyfunc maps float32 NHWC to (N, 10) logits, the same as the Keras model
    from robustlab.data.mnist import load_mnist

    x = load_mnist().test.x[:5]
    pyfunc_out = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(x))
    keras_out = np.asarray(mlflow.keras.load_model(f"runs:/{run_id}/model")(x, training=False))
    assert pyfunc_out.shape == (5, 10)
    np.testing.assert_allclose(pyfunc_out, keras_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(pyfunc_out.sum(axis=1), 1.0)  # logits, not probabilities

    # registered: the version, the alias and the logged-model id all carry the same exclusions
    mv = mlflow.register_model(f"models:/{logged.model_id}", "robustlab-mnist")
    client.set_registered_model_alias("robustlab-mnist", "champion", mv.version)
    for uri in (
        f"models:/robustlab-mnist/{mv.version}",
        "models:/robustlab-mnist@champion",
        f"models:/{logged.model_id}",
    ):
        prov = read_provenance(uri)
        assert prov.known and set(prov.excluded.tolist()) == excluded, uri
        assert prov.run_id == run_id

    # a version's own exclusions (the selection images register chose it on) are found from the
    # version whatever URI names the model: number, alias, latest, stage, logged-model id, copy
    from robustlab.provenance import VERSION_EXCLUDED_TAG

    client.set_model_version_tag("robustlab-mnist", mv.version, VERSION_EXCLUDED_TAG, "9990,9991")
    client.transition_model_version_stage("robustlab-mnist", mv.version, "Staging")
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path))
    for uri in (
        f"runs:/{run_id}/model",
        f"models:/robustlab-mnist/{mv.version}",
        "models:/robustlab-mnist@champion",
        "models:/robustlab-mnist/latest",
        "models:/robustlab-mnist/Staging",
        f"models:/{logged.model_id}",
        local,
    ):
        prov = read_provenance(uri)
        assert prov.known and set(prov.excluded.tolist()) == excluded | {9990, 9991}, uri
    assert main(["evaluate", "--model-uri", "models:/robustlab-mnist/latest", *EVAL_FAST]) == 0
    [latest] = [r for r in _runs() if r.data.tags.get("robustlab.model_uri", "").endswith("latest")]
    assert latest.data.params["n_excluded_sources"] == "495"
    client.delete_model_version_tag("robustlab-mnist", mv.version, VERSION_EXCLUDED_TAG)

    # evaluate through the alias: the excluded images are left out
    assert main(["evaluate", "--model-uri", "models:/robustlab-mnist@champion", *EVAL_FAST]) == 0
    [ev] = [r for r in _runs() if r.data.tags.get("robustlab.model_uri", "").endswith("@champion")]
    assert ev.data.params["n_excluded_sources"] == "493"

    # init_model through the registry: the child inherits the parent's exclusions
    child = _train(
        ["vanilla", *TINY, "--init-model", f"models:/robustlab-mnist/{mv.version}"], capsys
    )
    assert _excluded_artifact(child) == excluded
    child_meta = mlflow.models.get_model_info(f"runs:/{child}/model").metadata[METADATA_KEY]
    assert set(child_meta["excluded_test_indices"]) == excluded
    assert child_meta["init_model"] == f"models:/robustlab-mnist/{mv.version}"
    evaluated = mlflow.artifacts.download_artifacts(
        run_id=child, artifact_path="evaluated_test_indices.json"
    )
    with open(evaluated) as f:
        assert not set(json.load(f)["indices"]) & excluded


def _foreign_model() -> str:
    """A Keras model logged by plain MLflow (no robustlab provenance, no exclusions recorded)."""
    from robustlab.models import build_model

    with mlflow.start_run(run_name="foreign") as run:
        mlflow.keras.log_model(build_model("madry_cnn"), name="model")
    return f"runs:/{run.info.run_id}/model"


@pytest.mark.slow
def test_model_without_provenance_is_refused_unless_allowed(tracking, capsys):
    ensure_experiment()
    mlflow.set_experiment("robustlab")
    uri = _foreign_model()
    n_runs = len(_runs())

    assert main(["evaluate", "--model-uri", uri, *EVAL_FAST]) == 2
    _refused(capsys, "evaluate", "--allow-unknown-provenance")
    assert main(["vanilla", *TINY, "--init-model", uri]) == 2
    _refused(capsys, "vanilla", "--allow-unknown-provenance")
    assert len(_runs()) == n_runs  # nothing created

    assert main(["evaluate", "--model-uri", uri, *EVAL_FAST, "--allow-unknown-provenance"]) == 0
    [ev] = [r for r in _runs() if r.data.tags.get("robustlab.model_uri") == uri]
    assert ev.data.tags["robustlab.provenance"] == "unknown-allowed"
    assert ev.data.params["n_excluded_sources"] == "0"

    # a model trained from it carries incomplete provenance, so it is refused in turn
    child = _train(["vanilla", *TINY, "--init-model", uri, "--allow-unknown-provenance"], capsys)
    assert MlflowClient().get_run(child).data.tags["robustlab.provenance"] == "unknown-allowed"
    assert not read_provenance(f"runs:/{child}/model").known
    assert main(["evaluate", "--model-uri", f"runs:/{child}/model", *EVAL_FAST]) == 2
    _refused(capsys, "evaluate", "unknown provenance")


@pytest.mark.parametrize(
    "uri",
    ["models:/robustlab-mnist@champion", "models:/robustlab-mnist/7", "models:/known@nope"],
)
def test_unknown_registered_model_version_or_alias_is_one_line(tracking, capsys, uri):
    ensure_experiment()
    client = MlflowClient()
    client.create_registered_model("known")
    for argv, command in (
        (["evaluate", "--model-uri", uri, *EVAL_FAST], "evaluate"),
        (["vanilla", *TINY, "--init-model", uri], "vanilla"),
    ):
        assert main(argv) == 2
        # an unknown name is caught by the early URI check, an unknown alias/version on loading
        _refused(capsys, command, ("not found", "no registered model"))
    assert _runs() == []
