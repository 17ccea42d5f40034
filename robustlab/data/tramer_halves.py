"""The model-selection set for invariance, and the held-out half of Tramèr's sets.

The thesis validation pool holds only a handful of label-changed examples, so plain agreement
with human labels rewards a model that never changes its answer. Model selection (tuning)
therefore uses **balanced invariance accuracy** — the mean of the accuracy on label-changed and
on label-kept examples — on a *selection set*: the thesis validation split plus the Tramèr
examples (L∞ 0.3, L∞ 0.4, L0) made from one half of Tramèr's 100 source images. The other half
(the *test half*) is kept for the final report of tuned and registered models.

The split is by source image, seeded and fixed (``SELECTION_SPLIT_SEED``): no selection example
shares a source with a test example. Tramèr sources that are also thesis sources (MNIST test
images 159, 235, 247, 452) are thesis training/validation sources, so they always go to the
selection half. A model selected on the selection set records its sources as excluded test
images (``selection_sources``), so its clean/PGD test evaluation never uses them.
"""

from __future__ import annotations

import os

import numpy as np

from robustlab.data.invariance import InvarianceSet, load_invariance_set
from robustlab.data.pools import EVAL_SETS, TRAIN_POOL_SETS, InvPools
from robustlab.errors import DataError

SELECTION_SPLIT_SEED = 2020  # fixed: the split never depends on a run's seed
SELECTION_HALF = 50  # of Tramèr's 100 source images
SPLIT_ARTIFACT = "selection_split.json"


def _tramer_sources(data_dir: str | os.PathLike | None) -> np.ndarray:
    sources = [load_invariance_set(name, data_dir).source_index for name in EVAL_SETS]
    first = sources[0]
    for other in sources[1:]:
        if not np.array_equal(np.sort(first), np.sort(other)):
            raise DataError("Tramèr's sets do not share one list of source images (indexes.npy)")
    return np.unique(first).astype(np.int64)


def _pool_sources(data_dir: str | os.PathLike | None) -> np.ndarray:
    """MNIST test sources of the default training/validation pool (every example, ties included)."""
    parts = [
        s.source_index
        for s in (load_invariance_set(name, data_dir) for name in TRAIN_POOL_SETS)
        if s.source_split == "test"
    ]
    return np.unique(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)


def tramer_source_split(
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(selection_indices, test_indices): Tramèr's MNIST test source indices split in two halves.

    Sources shared with the thesis pool always go to the selection half; the rest are assigned
    by a permutation seeded with SELECTION_SPLIT_SEED. Both arrays are sorted np.int64.
    """
    tramer = _tramer_sources(data_dir)
    forced = np.intersect1d(tramer, _pool_sources(data_dir))
    rest = np.setdiff1d(tramer, forced)
    n_more = SELECTION_HALF - len(forced)
    if n_more < 0 or n_more > len(rest):
        raise DataError(
            f"cannot split {len(tramer)} Tramèr sources into a selection half of {SELECTION_HALF}"
        )
    perm = np.random.default_rng(SELECTION_SPLIT_SEED).permutation(rest)
    selection = np.union1d(forced, perm[:n_more]).astype(np.int64)
    test = np.setdiff1d(tramer, selection).astype(np.int64)
    return selection, test


def split_record(data_dir: str | os.PathLike | None = None) -> dict:
    """The split as a JSON-able record (logged as selection_split.json)."""
    selection, test = tramer_source_split(data_dir)
    return {
        "mnist_split": "test",
        "seed": SELECTION_SPLIT_SEED,
        "selection_half": SELECTION_HALF,
        "forced_to_selection": "Tramèr sources that are thesis pool sources",
        "selection_indices": selection.tolist(),
        "test_indices": test.tolist(),
    }


def _restrict(s: InvarianceSet, sources: np.ndarray, keep: bool) -> InvarianceSet:
    inside = np.isin(s.source_index, sources)
    return s.take(np.flatnonzero(inside if keep else ~inside))


def selection_sets(
    data_dir: str | os.PathLike | None, pools: InvPools | None
) -> dict[str, InvarianceSet]:
    """The selection set: the pools' validation split plus Tramèr's selection-half examples.

    Keys are set names; the validation split of a pool set is keyed `<name>[val]`.
    """
    selection, _ = tramer_source_split(data_dir)
    out: dict[str, InvarianceSet] = {}
    for s in pools.val if pools is not None else []:
        out[f"{s.name}[val]"] = s
    for name in EVAL_SETS:
        out[name] = _restrict(load_invariance_set(name, data_dir), selection, keep=True)
    return out


def selection_sources(data_dir: str | os.PathLike | None, pools: InvPools | None) -> np.ndarray:
    """MNIST test indices of every selection-set source (to add to a model's excluded images)."""
    parts = [s.source_index for s in selection_sets(data_dir, pools).values()]
    return np.unique(np.concatenate(parts)).astype(np.int64)


def test_half_sets(
    data_dir: str | os.PathLike | None, excluded: np.ndarray
) -> dict[str, InvarianceSet]:
    """Tramèr's sets on the test half only, minus any example whose source is in `excluded`."""
    _, test = tramer_source_split(data_dir)
    excluded = np.asarray(excluded, dtype=np.int64)
    out = {}
    for name in EVAL_SETS:
        s = _restrict(load_invariance_set(name, data_dir), test, keep=True)
        out[name] = _restrict(s, excluded, keep=False)
    return out


test_half_sets.__test__ = False  # not a pytest test, despite its name
