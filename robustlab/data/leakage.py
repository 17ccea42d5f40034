"""The leakage guard: which MNIST test images no evaluation may use."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from robustlab.data.invariance import InvarianceSet
from robustlab.errors import DataError


def excluded_test_indices(trained_on: Iterable[InvarianceSet]) -> np.ndarray:
    """Sorted MNIST test indices that are sources of any invariance example a model trained on.

    Every evaluation of that model (clean, PGD, invariance sets) must drop these images. Sets
    made from training images add nothing; a set with an unknown split raises DataError rather
    than being silently ignored.
    """
    sets = list(trained_on)
    for s in sets:
        if s.source_split not in ("train", "test"):
            raise DataError(
                f"{s.name}: unknown source split {s.source_split!r}; expected 'train' or 'test' "
                "(MNIST file split of the source images)"
            )
    parts = [np.asarray(s.source_index, dtype=np.int64) for s in sets if s.source_split == "test"]
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate(parts)).astype(np.int64)
