"""Shipped models: `register --export` writes a small MLflow model folder with its card; it loads,
evaluates (exclusions from its own metadata), serves and registers from a plain local path;
missing or altered weights, a foreign input contract, absent exclusions and oversize exports are
refused in one line. And whatever `pretrained/` in the repository ships matches its card."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# ART's import reconfigures logging and closes existing handlers' streams: import it before TF.
import art  # noqa: F401
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from robustlab.cli import main
from robustlab.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from robustlab.data.mnist import load_mnist
from robustlab.provenance import read_provenance
from robustlab.regimes import make_regime
from robustlab.train.runner import Extras, Judging, run_training
from tests.conftest import REPO

NAME = "robustlab-mnist"
SLICE = 1000
EVAL = ["--eval-size", "100", "--autoattack-size", "0", "--pgd-restarts", "0"]
EVAL += ["--curve-size", "20", "--curve-points", "2", "--pgd-engine", "robustlab"]


def _train(model: str, epochs: int) -> str:
    """A really trained tiny vanilla `model` (1,024 images, `epochs` epochs); its run id."""
    cfg = RunConfig(
        data=DataConfig(None, 1024, 100),
        train=TrainConfig(epochs=epochs, seed=0, patience=0, model=model, precision="float32"),
    ).validate()
    return run_training(
        make_regime("vanilla", epochs=epochs),
        cfg,
        EvalConfig(),
        Extras(judge=Judging(robust_eval=False)),
    )


def card_accuracy(folder: Path) -> float:
    """The check-slice clean accuracy CARD.md states."""
    text = (folder / "CARD.md").read_text()
    return float(re.search(r"check-slice clean accuracy \*\*([0-9.]+)\*\*", text).group(1))


def slice_accuracy(folder: Path) -> tuple[float, int]:
    """Clean accuracy of the folder's model on the first 1,000 MNIST test images outside the
    excluded sources its metadata names (computed here, not through robustlab's export)."""
    from robustlab.tracking import load_keras_model

    excluded = read_provenance(str(folder)).excluded
    test = load_mnist().test
    idx = np.flatnonzero(~np.isin(test.source_index, excluded))[:SLICE]
    model = load_keras_model(str(folder))
    pred = np.asarray(model(test.x[idx], training=False)).argmax(axis=1)
    return float(np.mean(pred == test.y[idx])), len(idx)


def _runs() -> int:
    client = MlflowClient()
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


def _refused(capsys, command: str, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"robustlab {command}: error:") and fragment in err[-1], err[-5:]
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_export_evaluate_serve_and_register_a_shipped_model(
    tracking, tmp_path, monkeypatch, capsys
):
    from tests.test_serve import serve_and_predict

    run_id = _train("small_cnn", 1)
    monkeypatch.chdir(tmp_path)  # the documented relative path, as in a fresh clone
    rel = "pretrained/tiny"
    argv = ["register", "--model-uri", f"runs:/{run_id}/model", "--export", rel]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    folder = tmp_path / rel
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 4 * 2**20
    meta = yaml.safe_load((folder / "MLmodel").read_text())["metadata"]["robustlab"]
    assert meta["run_id"] == run_id and meta["weights_sha256"]
    digest = meta["weights_sha256"]["data/model.keras"]
    assert digest in (folder / "CARD.md").read_text()
    # exclusions come from the folder's own metadata: those of the run that trained it
    excluded = read_provenance(rel).excluded
    np.testing.assert_array_equal(excluded, read_provenance(f"runs:/{run_id}/model").excluded)
    acc, n = slice_accuracy(folder)
    assert n == SLICE and acc > 0.5 and abs(acc - card_accuracy(folder)) <= 0.002
    assert main(argv) == 2  # an existing folder is never overwritten
    _refused(capsys, "register", "already exists")

    assert main(["evaluate", "--model-uri", rel, *EVAL]) == 0, capsys.readouterr().err[-3000:]
    client = MlflowClient()
    [ev] = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("robustlab.model_uri") == rel
    ]
    assert ev.data.params["n_excluded_sources"] == str(len(excluded))

    x = load_mnist().test.x[:4]
    expected = np.asarray(mlflow.pyfunc.load_model(rel).predict(x))
    np.testing.assert_allclose(serve_and_predict(rel, x, tracking, tmp_path), expected, atol=1e-4)

    assert main(["register", "--from", rel]) == 0, capsys.readouterr().err[-3000:]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.description == (folder / "CARD.md").read_text()
    assert champion.tags["robustlab.source_run_id"] == run_id
    uri = f"models:/{NAME}@champion"
    np.testing.assert_array_equal(read_provenance(uri).excluded, excluded)
    np.testing.assert_allclose(mlflow.pyfunc.load_model(uri).predict(x), expected, atol=1e-5)
    assert main(["register", "--from", rel]) == 0  # the same weights: no second version
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


@pytest.mark.slow
def test_bad_shipped_folders_and_oversize_exports_are_refused_in_one_line(
    tracking, tmp_path, capsys
):
    import keras

    from robustlab.model_folder import signature

    run_id = _train("small_cnn", 1)
    good = tmp_path / "good"
    assert main(["register", "--model-uri", f"runs:/{run_id}/model", "--export", str(good)]) == 0
    capsys.readouterr()

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    altered = copy("altered")
    weights = altered / "data" / "model.keras"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    missing = copy("missing")
    (missing / "data" / "model.keras").unlink()
    anonymous = copy("anonymous")  # its metadata (exclusions, digests) removed
    mlmodel = yaml.safe_load((anonymous / "MLmodel").read_text())
    mlmodel.pop("metadata")
    (anonymous / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    cifar = tmp_path / "cifar"  # another input contract: (N, 32, 32, 3)
    foreign = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 32, 32, 3))]),
        outputs=signature().outputs,
    )
    mlflow.keras.save_model(foreign, path=str(cifar), signature=sig)

    n_runs = _runs()
    for folder, fragment in (
        (altered, "was altered"),
        (missing, "is missing"),
        (cifar, "not float32 (-1, 28, 28, 1)"),
        (anonymous, "carries no robustlab provenance"),
    ):
        assert main(["evaluate", "--model-uri", str(folder), *EVAL]) == 2, folder.name
        _refused(capsys, "evaluate", fragment)
        assert main(["register", "--from", str(folder)]) == 2, folder.name
        _refused(capsys, "register", "export it with --export" if folder == anonymous else fragment)
    assert _runs() == n_runs and not MlflowClient().search_registered_models()

    big = _train("madry_cnn", 0)  # 3.3 M parameters: 13 MB of float32 weights
    out = tmp_path / "big"
    assert main(["register", "--model-uri", f"runs:/{big}/model", "--export", str(out)]) == 2
    _refused(capsys, "register", "more than the 4 MB")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_shipped_models_in_the_repository_match_their_cards():
    """Every model folder under pretrained/ loads (weights digests checked) and scores on the
    check slice what its CARD.md states."""
    folders = sorted(p for p in (REPO / "pretrained").glob("*") if (p / "MLmodel").is_file())
    if not folders:
        pytest.skip(
            "pretrained/ ships no model yet: the lead exports the champion there with "
            "`robustlab register --model-uri models:/robustlab-mnist@champion --export "
            "pretrained/<name>` after `make champion`"
        )
    for folder in folders:
        acc, n = slice_accuracy(folder)
        assert n == SLICE and abs(acc - card_accuracy(folder)) <= 0.002, folder.name
