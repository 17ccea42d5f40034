"""The pool of every human-labelled example and its source-grouped cross-validation folds."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.data.folds import (
    HUMAN_SETS,
    MIN_TRAIN_CHANGED,
    assign_folds,
    fold_pools,
    load_human_pool,
)
from robustlab.errors import ConfigError
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def pool():
    return load_human_pool(DATA_DIR)


def test_the_pool_holds_every_human_labelled_example_with_its_provenance(pool):
    assert tuple(pool.sets) == HUMAN_SETS
    assert [len(s) for s in pool.sets.values()] == [493, 100, 100, 100]  # 7 rater ties dropped
    assert int(pool.changed.sum()) == 139 and len(pool.sources) == 589
    rows = pool.rows()
    assert len(rows) == pool.n == 793
    thesis = [r for r in rows if r["set"] == "thesis_linf_eps0.3"]
    assert {r["label_from"] for r in thesis} == {"votes"} and min(r["n_votes"] for r in thesis) >= 9
    assert all(r["target_label"] >= 0 for r in thesis)
    tramer = [r for r in rows if r["set"] != "thesis_linf_eps0.3"]
    assert {r["label_from"] for r in tramer} == {"published"}
    assert all(r["target_label"] == -1 for r in tramer)
    # the thesis examples keep their position in the 500-example file (ties are gaps)
    assert len({r["index"] for r in thesis}) == 493 and max(r["index"] for r in thesis) == 499


def test_folds_are_deterministic_keep_sources_whole_and_spread_changed_examples(pool):
    a, b = assign_folds(pool, 5, 0), assign_folds(pool, 5, 0)
    np.testing.assert_array_equal(a.fold_of_example, b.fold_of_example)
    assert a.digest == b.digest != assign_folds(pool, 5, 1).digest
    for source in np.unique(a.source):
        assert len(set(a.fold_of_example[a.source == source])) == 1  # a source never splits
    counts = a.counts()
    assert sum(c["held_examples"] for c in counts) == pool.n
    changed = [c["held_changed"] for c in counts]
    assert max(changed) - min(changed) <= 3  # stratified: about 28 each
    assert "fold 4:" in a.describe() and "label-changed" in a.describe()


def test_the_guard_counts_what_each_fold_model_trains_on_after_the_validation_carve(pool):
    folds = assign_folds(pool, 5, 0)
    for f, c in enumerate(folds.counts()):
        pools, _ = fold_pools(pool, folds, f, "human")
        trained = sum(int(s.label_changed.sum()) for s in pools.train)  # after the carve
        validated = sum(int(s.label_changed.sum()) for s in pools.val)
        assert c["train_changed"] == trained >= MIN_TRAIN_CHANGED
        assert c["val_changed"] == validated > 0
        assert trained + validated + c["held_changed"] == int(pool.changed.sum())


def test_claim_one_regimes_train_on_the_same_thesis_examples_with_other_labels(pool):
    folds = assign_folds(pool, 5, 0)
    sets = ("thesis_linf_eps0.3",)
    human, held_h = fold_pools(pool, folds, 2, "human", train_sets=sets)
    target, held_t = fold_pools(pool, folds, 2, "target", train_sets=sets)
    for a, b in ((human.train, target.train), (human.val, target.val)):
        assert [s.name for s in a] == [s.name for s in b] == list(sets)
        np.testing.assert_array_equal(a[0].ids, b[0].ids)
    assert (human.train_pool().y != target.train_pool().y).any()  # only the labels differ
    # both predict every held-out example of the whole pool
    assert [len(s) for s in held_h] == [len(s) for s in held_t]
    assert {s.name for s in held_h} == set(HUMAN_SETS)


def test_every_example_is_held_out_exactly_once_and_never_trained_on_its_source(pool):
    folds = assign_folds(pool, 5, 0)
    held = []
    for f in range(5):
        pools, predict = fold_pools(pool, folds, f, "human")
        train_sources = {int(i) for s in pools.used_sets for i in s.source_index}
        predict_sources = {int(i) for s in predict for i in s.source_index}
        assert train_sources and not train_sources & predict_sources
        val_sources = {int(i) for s in pools.val for i in s.source_index}
        assert val_sources and not val_sources & {
            int(i) for s in pools.train for i in s.source_index
        }
        held += [(s.name, int(i)) for s in predict for i in s.ids]
    assert len(held) == len(set(held)) == pool.n
    target, _ = fold_pools(pool, folds, 0, "target")  # only the thesis set has target labels
    assert {s.name for s in target.train if len(s)} == {"thesis_linf_eps0.3"}


@pytest.mark.parametrize(
    ("k", "fragment"),
    [
        (1, "inv_folds must be >= 2"),
        (2, "leaves a fold model"),
        (3, f"fewer than {MIN_TRAIN_CHANGED}"),
        (590, "more than the pool's 589 MNIST sources"),
    ],
)
def test_fold_counts_that_cannot_work_are_one_line(pool, k, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        assign_folds(pool, k, 0)
    assert "\n" not in str(info.value)


def test_small_folds_are_allowed_only_when_asked(pool):
    folds = assign_folds(pool, 2, 0, allow_small_folds=True)
    assert min(c["train_changed"] for c in folds.counts()) < MIN_TRAIN_CHANGED


def test_an_unknown_set_in_the_pool_is_one_line():
    with pytest.raises(ConfigError, match="unknown invariance set"):
        load_human_pool(DATA_DIR, ("thesis_linf_eps0.3", "mnist_c"))
