from __future__ import annotations

import numpy as np
import pytest

from robustlab.config import MixConfig
from robustlab.errors import ConfigError, DataError
from robustlab.train.mixture import Mixture, Pool


def _pool(n: int, label: int, name: str) -> Pool:
    x = np.random.default_rng(n).random((n, 28, 28, 1), dtype=np.float32)
    return Pool(x, np.full(n, label, np.int64), name)


def test_counts_follow_the_proportions_and_an_epoch_covers_mnist_once():
    mnist, inv = _pool(1000, 1, "mnist"), _pool(30, 2, "inv")
    mix = Mixture(mnist, MixConfig(clean=0.5, ptb=0.25, inv=0.25), batch_size=100, inv=inv)
    assert mix.counts == {"clean": 50, "ptb": 25, "inv": 25}
    batches = list(mix.epoch(np.random.default_rng(0)))
    assert len(batches) == mix.steps_per_epoch == 1000 // 75
    for b in batches:
        assert b.x.shape == (100, 28, 28, 1) and b.n_adv == 25
        assert (b.y[:75] == 1).all() and (
            b.y[75:] == 2
        ).all()  # MNIST rows first, attacked rows leading
    seen = np.concatenate([b.x[:75] for b in batches]).reshape(len(batches) * 75, -1)
    assert len(np.unique(seen, axis=0)) == len(seen)  # no MNIST image twice in one epoch


def test_small_invariance_pool_is_oversampled_evenly():
    mix = Mixture(
        _pool(2000, 1, "mnist"),
        MixConfig(clean=0.5, inv=0.5),
        batch_size=64,
        inv=_pool(10, 3, "inv"),
    )
    inv_rows = np.concatenate([b.x[32:] for b in mix.epoch(np.random.default_rng(1))])
    _, counts = np.unique(inv_rows.reshape(len(inv_rows), -1), axis=0, return_counts=True)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1


def test_bad_mixtures_fail_before_training():
    mnist = _pool(100, 1, "mnist")
    with pytest.raises(ConfigError, match="sum to 1"):
        Mixture(mnist, MixConfig(clean=0.5, ptb=0.4, inv=0.0), batch_size=10)
    with pytest.raises(ConfigError, match="mix_clean must lie in"):
        Mixture(mnist, MixConfig(clean=1.2, ptb=-0.2, inv=0.0), batch_size=10)
    with pytest.raises(ConfigError, match="invariance pool is empty"):
        Mixture(mnist, MixConfig(clean=0.5, inv=0.5), batch_size=10, inv=None)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        Pool(np.full((3, 28, 28, 1), 255.0, np.float32), np.zeros(3, np.int64), "bytes")
