"""The invariance data protocol: training/validation pools, label sources, user label stores."""

from __future__ import annotations

import numpy as np
import pytest

from robustlab.data.invariance import load_invariance_set
from robustlab.data.labels import store_from_arrays
from robustlab.data.leakage import excluded_test_indices
from robustlab.data.pools import load_eval_sets, load_inv_pools
from robustlab.errors import ConfigError
from tests.conftest import DATA_DIR


def test_thesis_pool_is_split_by_source_and_uses_the_tie_policy():
    pools = load_inv_pools(DATA_DIR)
    [train], [val] = pools.train, pools.val
    assert not set(train.source_index) & set(val.source_index)
    assert len(train) + len(val) == 493  # the 7 rater ties are dropped
    assert (train.human_label >= 0).all() and train.images.max() <= 1.0
    pool = pools.train_pool()
    np.testing.assert_array_equal(pool.y, train.human_label)
    target = load_inv_pools(DATA_DIR, "target").train_pool()
    assert (target.y != pool.y).mean() > 0.9  # the attack's targets are rarely what humans saw


def test_label_sources_the_pool_does_not_have_are_refused():
    with pytest.raises(ConfigError, match="no human labels"):
        load_inv_pools(DATA_DIR, "human", ("thesis_linf_eps0.4",))
    with pytest.raises(ConfigError, match="unknown inv_label_source"):
        load_inv_pools(DATA_DIR, "majority")


def test_a_users_label_store_joins_the_pool(tmp_path):
    cands = load_invariance_set("thesis_linf_eps0.4", DATA_DIR).take(np.arange(20))
    store = store_from_arrays(
        tmp_path / "labels.json",
        cands.images[..., 0],
        source_split="test",
        source_index=cands.source_index,
        original_label=cands.original_label,
        target_label=cands.target_label,
        eps=0.4,
        norm="linf",
        name="mine",
    )
    for i, example in enumerate(store.examples):
        for rater in ("ann", "bob"):
            store.add_vote(
                example.id,
                rater,
                int(cands.original_label[i]) if i % 4 else int(cands.target_label[i]),
                save=False,
            )
    store.save()
    pools = load_inv_pools(DATA_DIR, "human", ("thesis_linf_eps0.3", str(tmp_path / "labels.json")))
    assert [s.name for s in pools.train] == ["thesis_linf_eps0.3", "mine"]
    mine = [s for s in pools.used_sets if s.name == "mine"]
    assert sum(len(s) for s in mine) == 20 and all(s.votes.shape[1] == 2 for s in mine)
    assert (
        int(sum(s.label_changed.sum() for s in mine)) == 5
    )  # every 4th example voted to its target
    assert len(pools.train_pool()) == sum(len(s) for s in pools.train)


def test_evaluation_sets_drop_examples_whose_source_was_trained_on():
    pools = load_inv_pools(DATA_DIR)
    excluded = excluded_test_indices(pools.used_sets)
    sets = load_eval_sets(DATA_DIR, excluded)
    shared = {159, 235, 247, 452}
    assert shared <= set(excluded.tolist())
    for s in sets.values():
        assert len(s) == 96 and not shared & set(s.source_index.tolist())
