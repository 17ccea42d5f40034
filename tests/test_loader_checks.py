"""Invariance pools and label-store examples are checked when read (scale, shape, source index)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import numpy as np
import pytest

from robustlab.data import labels as L
from robustlab.data.invariance import load_invariance_set
from robustlab.errors import DataError
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def tramer():
    return load_invariance_set("tramer_linf_eps0.3", DATA_DIR)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda s: {"images": s.images.astype(np.float64)}, "float32 array (N, 28, 28, 1)"),
        (lambda s: {"images": s.images[..., 0]}, "float32 array (N, 28, 28, 1)"),
        (lambda s: {"images": s.images * 255.0}, "divide by 255"),
        (lambda s: {"source_index": s.source_index + 10_000}, "must lie in 0..9999"),
        (lambda s: {"original_label": s.original_label + 10}, "original labels must lie in 0..9"),
        (lambda s: {"source_index": s.source_index.astype(np.float64)}, "must hold integers"),
    ],
)
def test_invariance_sets_refuse_bad_arrays(tramer, change, fragment):
    with pytest.raises(DataError) as info:
        replace(tramer, **change(tramer))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_training_split_set_may_use_training_indices(tramer):
    moved = replace(tramer, source_split="train", source_index=tramer.source_index + 50_000)
    assert moved.source_index.max() >= 50_000


def _store_file(tmp_path, tramer):
    store = L.store_from_set(tmp_path / "s.json", tramer.take(np.arange(3)), prefix="t")
    store.save()
    return tmp_path / "s.json"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("image", np.full((28, 28), 2.0, "<f4"), "pixels must be finite and lie in [0, 1]"),
        ("image", np.full((28, 28), np.nan, "<f4"), "pixels must be finite and lie in [0, 1]"),
        ("source_index", 10_000, "is not an MNIST image"),
        ("source_split", "validation", "is not an MNIST image"),
        ("original_label", 11, "original_label 11 is not in 0..9"),
    ],
)
def test_label_store_examples_are_checked_when_read(tmp_path, tramer, field, value, fragment):
    path = _store_file(tmp_path, tramer)
    assert len(L.LabelStore.load(path)) == 3  # the untouched store loads
    doc = json.loads(path.read_text())
    if field == "image":
        value = base64.b64encode(value.tobytes()).decode("ascii")
    doc["examples"][1][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        L.LabelStore.load(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)
