"""The leakage guard: MNIST test images that evaluations of a model must exclude."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from robustlab.data.invariance import load_invariance_set
from robustlab.data.leakage import excluded_test_indices
from robustlab.data.mnist import load_raw_mnist
from robustlab.errors import DataError

DATA = Path(
    os.environ.get("ROBUSTLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
SHARED = [159, 235, 247, 452]  # sources in both the thesis and the Tramèr sets


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_DATA_DIR", str(DATA))


@pytest.fixture(scope="module")
def sets():
    return {
        n: load_invariance_set(n, DATA)
        for n in ("thesis_linf_eps0.3", "thesis_linf_eps0.4", "tramer_linf_eps0.3", "tramer_l0")
    }


def test_shared_sources_are_in_both_sets(sets):
    thesis = set(sets["thesis_linf_eps0.3"].source_index.tolist())
    tramer = set(sets["tramer_linf_eps0.3"].source_index.tolist())
    assert sorted(thesis & tramer) == SHARED


def test_thesis_and_tramer_together(sets):
    out = excluded_test_indices([sets["thesis_linf_eps0.3"], sets["tramer_linf_eps0.3"]])
    assert out.dtype == np.int64 and np.all(np.diff(out) > 0)  # sorted, no duplicates
    assert len(out) == 500 + 100 - len(SHARED)
    assert np.isin(SHARED, out).all() and np.isin(np.arange(500), out).all()
    assert np.isin(sets["tramer_linf_eps0.3"].source_index, out).all()


def test_each_set_alone(sets):
    tramer = excluded_test_indices([sets["tramer_l0"]])
    assert (
        len(tramer) == 100
        and np.isin(SHARED, tramer).all()
        and not np.isin(np.arange(159), tramer).all()
    )
    thesis = excluded_test_indices([sets["thesis_linf_eps0.4"]])
    assert np.array_equal(thesis, np.arange(500))
    assert excluded_test_indices([]).shape == (0,)


def test_subset_excludes_only_what_was_trained_on(sets):
    part = sets["thesis_linf_eps0.3"].take(np.array([159, 235, 3]))
    assert excluded_test_indices([part]).tolist() == [3, 159, 235]
    assert excluded_test_indices(iter([part, part])).tolist() == [3, 159, 235]  # any iterable


def test_training_split_sets_add_nothing(sets):
    from_train = replace(sets["tramer_linf_eps0.3"], name="generated", source_split="train")
    assert excluded_test_indices([from_train]).shape == (0,)
    both = excluded_test_indices([from_train, sets["thesis_linf_eps0.3"]])
    assert np.array_equal(both, np.arange(500))


def test_unknown_split_is_an_error_not_a_silent_leak(sets):
    odd = replace(sets["tramer_linf_eps0.3"], name="odd", source_split="validation")
    with pytest.raises(DataError, match="unknown source split"):
        excluded_test_indices([odd, sets["thesis_linf_eps0.3"]])


def test_guard_output_filters_the_test_split(sets):
    """What evaluations do with the guard's output: `Split.without_sources` on the test split."""
    from robustlab.data.mnist import load_mnist

    test = load_mnist(DATA).test
    raw = load_raw_mnist(DATA, download=False)
    kept = test.without_sources(excluded_test_indices(sets.values()))
    assert len(kept) == 10_000 - 596
    assert not np.isin(SHARED, kept.source_index).any()
    assert not np.isin(np.arange(500), kept.source_index).any()  # every thesis source is gone
    # the images that stay are the MNIST test images of those indices, untouched
    np.testing.assert_array_equal(kept.y, raw.y_test[kept.source_index])
    np.testing.assert_array_equal(kept.x[..., 0] * 255.0, raw.x_test[kept.source_index])
