"""The L∞ invariance generator against the published sets, scipy and the sklearn reference."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from robustlab import cli
from robustlab.errors import ConfigError
from robustlab.invariance.generator import (
    ALLOWED_TARGETS,
    GRID,
    TrainingPool,
    check_eps,
    generate_linf,
    nearest_neighbours,
    project_linf,
    reference_linf,
    transform_copies,
    transform_copies_naive,
)

DATA = Path(
    os.environ.get("ROBUSTLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
INV = DATA / "invariance"


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA_DIR", str(DATA))


@pytest.fixture(scope="module")
def mnist():
    with np.load(DATA / "mnist.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def pool(mnist):
    return TrainingPool(mnist["x_train"], mnist["y_train"])


def test_grid_is_775_transforms():
    assert GRID.shape == (775, 3)
    assert sorted(set(GRID[:, 0])) == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert len(set(GRID[:, 2])) == 31 and GRID[:, 2].min() == -30 and GRID[:, 2].max() == 30


def test_transform_copies_bit_identical_to_one_scipy_call_per_transform(mnist):
    for x in (mnist["x_test"][0], mnist["x_train"][7], mnist["x_test"][452]):
        fast = transform_copies(x)
        assert fast.dtype == np.uint8 and fast.shape == (775, 784)
        assert np.array_equal(fast, transform_copies_naive(x))


# every 20th of the thesis's 500 sources: 25 images spread over the whole set
THESIS_SUBSET = np.arange(0, 500, 20)


def test_reproduces_thesis_sets_exactly(mnist, pool):
    idx = THESIS_SUBSET
    res = generate_linf(mnist["x_test"][idx], mnist["y_test"][idx], [0.3, 0.4], pool)
    for k, eps in enumerate(("0.3", "0.4")):
        folder = INV / "thesis" / f"eps{eps}"
        ref = np.load(folder / "invariance-based_adversarial_examples.npy")[idx]
        target = np.load(folder / "invariance-based_adversarial_examples_new_labels.npy")[idx]
        assert np.array_equal(res.images[k], ref), f"eps {eps}: images differ"
        assert np.array_equal(res.target_label[k], target), f"eps {eps}: target labels differ"


def test_reproduces_tramer_linf_eps03_exactly(mnist, pool):
    order = np.load(INV / "tramer2020" / "indexes.npy")
    pick = np.array(
        [0, 1, 2, 3, 17, 42, 63, 99]
    )  # includes the four shared sources 159, 235, 247, 452
    src = order[pick]
    res = generate_linf(mnist["x_test"][src], mnist["y_test"][src], [0.3], pool)
    ref = np.load(INV / "tramer2020" / "linf" / "automated_eps03.npy")[pick]
    assert np.array_equal(res.images[0], ref)


def test_matches_sklearn_reference(mnist, pool):
    x, y = mnist["x_test"][500:502], mnist["y_test"][500:502]
    ours = generate_linf(x, y, [0.3], pool)
    ref_img, ref_tgt = reference_linf(x, y, 0.3, mnist["x_train"], mnist["y_train"])
    assert np.array_equal(ours.images[0], ref_img)
    assert np.array_equal(ours.target_label[0], ref_tgt)


def test_outputs_stay_in_ball_and_move_to_allowed_targets(mnist, pool):
    x, y = mnist["x_train"][:6], mnist["y_train"][:6]
    res = generate_linf(x, y, [0.1, 0.3], pool, exclude_train_index=np.arange(6))
    for k, eps in enumerate((0.1, 0.3)):
        diff = np.abs(res.images[k] - x.astype(np.float32))
        assert diff.max() <= 255 * eps + 1e-4
        assert res.images[k].min() >= 0 and res.images[k].max() <= 255
        for i in range(6):
            assert res.target_label[k, i] in ALLOWED_TARGETS[int(y[i])]


def test_training_source_is_excluded_from_its_own_pool(mnist):
    # a training pool where the source image also appears, mislabelled as an allowed target
    x_src = mnist["x_train"][0]  # a 5: may move to 3 or 8
    keep = np.flatnonzero(mnist["y_train"][:3000] == 3)
    x_pool = np.concatenate([mnist["x_train"][keep], x_src[None]])
    y_pool = np.concatenate([mnist["y_train"][keep], [3]])
    small = TrainingPool(x_pool, y_pool)
    copies = transform_copies(x_src)
    planted = len(x_pool) - 1
    found = nearest_neighbours(copies, small, 3)
    assert found.train_index == planted and found.sqdist == 0
    excluded = nearest_neighbours(copies, small, 3, exclude=planted)
    assert excluded.train_index != planted and excluded.sqdist > 0


def test_project_linf_rules():
    x = np.array([[0, 0, 100, 200, 100]], dtype=np.uint8)
    t = np.array([[50, 200, 130, 10, 100]], dtype=np.uint8)
    out = project_linf(x, t, 0.3)  # radius 76.5
    # x=0 and t within the ball: unchanged; far pixels move by 76.5; near inked pixels copy t
    assert out.tolist() == [[0.0, 76.5, 130.0, 123.5, 100.0]]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_eps_out_of_range_is_rejected(bad):
    with pytest.raises(ConfigError, match="outside"):
        check_eps([bad])


# ---- the generate command ------------------------------------------------------------------
@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_TRACKING_DIR", str(tmp_path / "tracking"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return tmp_path


def test_generate_command_logs_candidates(tracking, mnist):
    out = tracking / "candidates.npz"
    rc = cli.main(
        [
            "generate",
            "--split",
            "train",
            "--start",
            "10",
            "--count",
            "3",
            "--eps",
            "0.3,0.4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with np.load(out) as z:
        assert z["images"].dtype == np.float32 and z["images"].shape == (6, 28, 28)
        assert z["images"].min() >= 0 and z["images"].max() <= 1
        assert z["source_split"].tolist() == ["train"] * 6
        assert z["source_index"].tolist() == [10, 11, 12] * 2
        assert z["eps"].tolist() == [0.3] * 3 + [0.4] * 3
        assert np.array_equal(z["original_label"], np.tile(mnist["y_train"][10:13], 2))
        assert all(
            t in ALLOWED_TARGETS[o]
            for o, t in zip(z["original_label"], z["target_label"], strict=True)
        )
        assert str(z["generator_version"]).startswith("linf-")
        assert (np.abs(z["images"][:3] - mnist["x_train"][10:13] / 255.0).max()) <= 0.3 + 1e-6
    import mlflow

    runs = mlflow.search_runs(experiment_names=["robustlab"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["eps"] == "0.3,0.4"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"candidates.npz", "candidates_grid.png"} <= names
    with sqlite3.connect(tracking / "tracking" / "mlflow.db") as db:
        assert db.execute("select count(*) from inputs").fetchone()[0] >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--norm", "l2"], "unknown norm"),
        (["--eps", "0"], "outside (0, 1)"),
        (["--eps", "1.2"], "outside (0, 1)"),
        (["--eps", "abc"], "not a number"),
        (["--split", "test", "--start", "9990", "--count", "20"], "outside the test split"),
        (["--split", "valid"], "unknown split"),
    ],
)
def test_generate_bad_input_is_one_line_error(tracking, capsys, argv, message):
    rc = cli.main(["generate", "--count", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
