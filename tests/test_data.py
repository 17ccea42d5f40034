"""The data layer: MNIST location, validation, scaling, split; invariance set loaders."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.data.invariance import load_invariance_set
from robustlab.data.mnist import load_mnist, load_raw_mnist
from robustlab.data.validate import check_images, to_unit
from robustlab.errors import DataError
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(DATA_DIR)


def test_split_sizes_scale_and_disjointness(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55_000, 5_000, 10_000)
    for split in (mnist.train, mnist.val, mnist.test):
        assert split.x.dtype == np.float32 and split.x.shape[1:] == (28, 28, 1)
        assert split.x.min() == 0.0 and split.x.max() == 1.0
        assert split.y.min() == 0 and split.y.max() == 9
    assert not set(mnist.train.source_index) & set(mnist.val.source_index)
    raw = load_raw_mnist(DATA_DIR)
    i = mnist.val.source_index[3]
    np.testing.assert_allclose(mnist.val.x[3, ..., 0], raw.x_train[i] / 255.0, atol=1e-7)
    assert mnist.val.y[3] == raw.y_train[i]
    assert np.bincount(raw.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_split_is_fixed_and_subsets_are_seeded(mnist):
    again = load_mnist(DATA_DIR, train_size=1000, eval_size=500)
    np.testing.assert_array_equal(again.val.source_index, mnist.val.source_index)
    np.testing.assert_array_equal(again.train.source_index, mnist.train.source_index[:1000])
    assert len(again.test) == 500 and len(np.unique(again.test.source_index)) == 500
    np.testing.assert_array_equal(
        load_mnist(DATA_DIR, eval_size=500).test.source_index, again.test.source_index
    )


def test_without_sources_drops_exactly_those_images(mnist):
    kept = mnist.test.without_sources(np.array([159, 235, 247, 452]))
    assert len(kept) == 9_996
    assert not {159, 235, 247, 452} & set(kept.source_index.tolist())


def _write_npz(path, **overrides):
    with np.load(DATA_DIR / "mnist.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(overrides)
    np.savez(path / "mnist.npz", **arrays)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"x_train": np.zeros((60_000, 28, 27), np.uint8)}, "shape"),
        ({"y_test": np.full(10_000, 10, np.uint8)}, "labels must lie in 0..9"),
        ({"x_test": np.full((10_000, 28, 28), 0.5, np.float32)}, "already scaled"),
    ],
)
def test_bad_mnist_files_fail_with_clear_errors(tmp_path, overrides, message):
    _write_npz(tmp_path, **overrides)
    with pytest.raises(DataError, match=message):
        load_raw_mnist(tmp_path)


def test_missing_and_corrupt_files(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="ROBUSTLAB_DATA_DIR"):
        load_raw_mnist(tmp_path)
    (tmp_path / "mnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_raw_mnist(tmp_path)
    monkeypatch.setenv("ROBUSTLAB_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="ROBUSTLAB_DATA_DIR"):
        load_raw_mnist()


def test_scale_checks_refuse_the_wrong_declared_scale():
    byte_images = np.full((2, 28, 28), 200, np.uint8)
    with pytest.raises(DataError, match="divide by 255"):
        check_images(byte_images.astype(np.float32), scale="unit", what="x")
    with pytest.raises(DataError, match="already scaled"):
        check_images(np.full((2, 28, 28), 0.7, np.float32), scale="byte", what="x")
    out = to_unit(byte_images, scale="byte", what="x")
    assert (
        out.shape == (2, 28, 28, 1) and out.dtype == np.float32 and np.isclose(out.max(), 200 / 255)
    )


def test_invariance_sets_are_rescaled_with_provenance():
    thesis = load_invariance_set("thesis_linf_eps0.3", DATA_DIR)
    assert thesis.images.shape == (500, 28, 28, 1) and thesis.images.max() <= 1.0
    assert thesis.has_human_labels and thesis.votes.shape == (500, 10)
    assert int(thesis.label_changed.sum()) == 29  # README: humans changed the digit for 29 of 500
    raw = load_raw_mnist(DATA_DIR)
    np.testing.assert_array_equal(thesis.original_label, raw.y_test[:500])
    tramer = load_invariance_set("tramer_linf_eps0.3", DATA_DIR)
    assert tramer.source_split == "test" and len(tramer) == 100
    assert round(float(tramer.label_changed.mean()), 2) == 0.21
    candidates = load_invariance_set("thesis_linf_eps0.4", DATA_DIR)
    assert (
        not candidates.has_human_labels
        and (candidates.target_label != candidates.original_label).all()
    )
