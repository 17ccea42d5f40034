"""The invariance selection set / test half split and balanced invariance accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.data.invariance import load_invariance_set
from robustlab.data.pools import load_inv_pools
from robustlab.data.tramer_halves import (
    selection_sets,
    selection_sources,
    split_record,
    test_half_sets,
    tramer_source_split,
)
from robustlab.evaluation.validation import (
    balanced_inv_accuracy,
    inv_accuracy,
    selection_validation,
)
from tests.conftest import DATA_DIR

SHARED_WITH_THESIS = [159, 235, 247, 452]


class LookupModel:
    """Answers a fixed label per image (looked up by the image's bytes): a model that never
    changes its answer when it answers each example's source label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.table = {img.tobytes(): int(lab) for img, lab in zip(images, labels, strict=True)}

    def __call__(self, x, training=False):
        x = np.asarray(x)
        return np.eye(10, dtype=np.float32)[[self.table[img.tobytes()] for img in x]]


def test_split_is_a_fixed_disjoint_halving_of_tramers_sources():
    selection, test = tramer_source_split(DATA_DIR)
    tramer = load_invariance_set("tramer_l0", DATA_DIR).source_index
    assert len(selection) == len(test) == 50
    assert not set(selection) & set(test)
    assert set(selection) | set(test) == set(tramer)
    assert set(SHARED_WITH_THESIS) <= set(selection)  # thesis sources never reach the test half
    again = tramer_source_split(DATA_DIR)
    np.testing.assert_array_equal(again[0], selection)
    record = split_record(DATA_DIR)
    assert record["selection_indices"] == selection.tolist()
    assert record["test_indices"] == test.tolist()


def test_selection_and_test_half_share_no_source_and_selection_sees_label_changes():
    pools = load_inv_pools(DATA_DIR)
    sel = selection_sets(DATA_DIR, pools)
    half = test_half_sets(DATA_DIR, np.empty(0, np.int64))
    sel_sources = selection_sources(DATA_DIR, pools)
    assert set(sel_sources) == set(np.concatenate([s.source_index for s in sel.values()]))
    for s in half.values():
        assert len(s) == 50
        assert not np.isin(s.source_index, sel_sources).any()
    assert set(pools.val[0].source_index) <= set(sel_sources)
    n_changed = sum(int(s.label_changed.sum()) for s in sel.values())
    assert n_changed >= 40  # the thesis validation split alone has only a handful
    assert sum(int(s.label_changed.sum()) for s in pools.val) < 10
    dropped = test_half_sets(DATA_DIR, half["tramer_l0"].source_index[:5])
    assert all(len(s) == 45 for s in dropped.values())


def test_balanced_accuracy_exposes_a_model_that_never_changes_its_answer():
    pools = load_inv_pools(DATA_DIR)
    sets = selection_sets(DATA_DIR, pools)
    images = np.concatenate([s.images for s in sets.values()])
    never_changes = LookupModel(images, np.concatenate([s.original_label for s in sets.values()]))
    m = balanced_inv_accuracy(never_changes, sets, "sel")
    assert m["sel/inv_acc_kept"] == 1.0 and m["sel/inv_acc_changed"] == 0.0
    assert m["sel/inv_bal_acc"] == pytest.approx(0.5)
    assert m["sel/inv_acc"] > 0.7  # plain agreement looks good
    assert m["sel/n_inv_changed"] + m["sel/n_inv_kept"] == sum(len(s) for s in sets.values())
    human = LookupModel(images, np.concatenate([s.human_label for s in sets.values()]))
    assert balanced_inv_accuracy(human, sets, "sel")["sel/inv_bal_acc"] == 1.0
    validate = selection_validation(list(sets.values()))
    v = validate(never_changes)
    assert v["val/sel_inv_bal_acc"] == pytest.approx(0.5)
    assert v["val/sel_inv_acc"] == pytest.approx(m["sel/inv_acc"])
    per_set = inv_accuracy(never_changes, sets["tramer_l0"], "test")
    assert per_set["test/inv_bal_acc/tramer_l0"] == pytest.approx(0.5)


def test_human_pool_accuracy_counts_only_examples_no_training_source_touched():
    from robustlab.evaluation.validation import human_pool_accuracy
    from tests.test_attacks import trained_model

    model, _ = trained_model()
    everything = human_pool_accuracy(model, np.empty(0, np.int64), DATA_DIR)
    assert everything["test/human_pool_n_changed"] == 139
    assert everything["test/human_pool_n_kept"] == 793 - 139
    # a model that trained on the thesis sources (MNIST test 0..499) is judged on Tramèr's
    # examples whose sources lie elsewhere: 100 sources x 3 sets, minus the 4 shared ones
    m = human_pool_accuracy(model, np.arange(500), DATA_DIR)
    assert m["test/human_pool_n_changed"] + m["test/human_pool_n_kept"] == 300 - 3 * 4
    for key in (
        "test/human_pool_acc_changed",
        "test/human_pool_acc_kept",
        "test/human_pool_bal_acc",
    ):
        assert 0 <= m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"] <= 1
    assert m["test/human_pool_bal_acc"] == pytest.approx(
        (m["test/human_pool_acc_changed"] + m["test/human_pool_acc_kept"]) / 2
    )
