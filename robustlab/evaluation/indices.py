"""Which MNIST test images an evaluation used: a fixed index set, checked and logged."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from robustlab.data.mnist import Split
from robustlab.errors import RobustlabError

EVALUATED_ARTIFACT = "evaluated_test_indices.json"  # the MNIST test images an evaluation used
PER_EXAMPLE_ARTIFACT = "per_example.csv"  # each evaluated image's outcome under every attack


def indices_digest(indices: Sequence[int] | np.ndarray) -> str:
    """A short digest of a list of MNIST indices (same images, same digest)."""
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def take_test_indices(test: Split, indices: Sequence[int], excluded: np.ndarray) -> Split:
    """The images of `test` whose source index is in `indices`, in that order.

    Fails closed (RobustlabError) when an index is a source the model must not be evaluated on
    (`excluded`), is not in `test`, or is repeated.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) == 0:
        raise RobustlabError("test_indices is empty; pass the MNIST test indices to evaluate on")
    if len(np.unique(idx)) != len(idx):
        raise RobustlabError("test_indices holds repeated indices")
    leaked = np.intersect1d(idx, np.asarray(excluded, dtype=np.int64))
    if len(leaked):
        raise RobustlabError(
            f"test_indices include {len(leaked)} source image(s) of this model's invariance "
            f"examples (e.g. test[{int(leaked[0])}]); evaluating on them would leak"
        )
    position = {int(s): i for i, s in enumerate(test.source_index)}
    missing = [int(i) for i in idx if int(i) not in position]
    if missing:
        raise RobustlabError(
            f"test_indices hold {len(missing)} index(es) not in the MNIST test split "
            f"(e.g. {missing[0]})"
        )
    return test.take(np.array([position[int(i)] for i in idx], dtype=np.int64))


def log_evaluated_indices(test: Split) -> None:
    """Log `evaluated_test_indices.json` (split and source indices) to the active MLflow run."""
    import mlflow

    mlflow.log_dict(
        {"mnist_split": test.source_split, "indices": [int(i) for i in test.source_index]},
        EVALUATED_ARTIFACT,
    )
