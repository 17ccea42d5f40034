"""Batch mixtures: each batch = clean MNIST + MNIST images to attack on the fly + invariance examples.

Every regime is a mixture. The counts per batch are fixed (rounded from the proportions) so the
`tf.function` train step is traced once; the first `n_adv` rows of a batch are the ones the train
step perturbs against the current model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from robustlab.config import MixConfig
from robustlab.data.pools import Pool
from robustlab.errors import ConfigError


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    y: np.ndarray
    n_adv: int  # rows [0, n_adv) are perturbed by the train step's attack


class Mixture:
    """Draws batches from an MNIST pool (clean + to-be-attacked) and an optional invariance pool.

    An epoch is one pass over the MNIST pool (or over the invariance pool when the mixture holds
    no MNIST share); the small invariance pool is oversampled by cycling through reshuffles.
    """

    def __init__(self, mnist: Pool, mix: MixConfig, batch_size: int, inv: Pool | None = None):
        mix.validate()
        if mix.inv > 0 and (inv is None or len(inv) == 0):
            raise ConfigError(
                "mix_inv > 0 but the invariance pool is empty; add labelled invariance examples or set mix_inv=0"
            )
        self.mnist, self.inv, self.mix, self.batch_size = mnist, inv, mix, batch_size
        self.n_inv = round(batch_size * mix.inv) if inv is not None else 0
        self.n_adv = round(batch_size * mix.ptb)
        self.n_mnist = batch_size - self.n_inv
        if self.n_adv > self.n_mnist:
            self.n_adv = self.n_mnist
        if self.n_mnist > 0:
            if len(mnist) < self.n_mnist:
                raise ConfigError(
                    f"train_size={len(mnist)} is smaller than one batch's MNIST share ({self.n_mnist})"
                )
            self.steps_per_epoch = len(mnist) // self.n_mnist
        else:
            self.steps_per_epoch = max(1, len(inv) // self.n_inv)

    @property
    def counts(self) -> dict[str, int]:
        return {"clean": self.n_mnist - self.n_adv, "ptb": self.n_adv, "inv": self.n_inv}

    def _inv_stream(self, rng: np.random.Generator) -> Iterator[int]:
        while True:
            yield from rng.permutation(len(self.inv))

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        perm = rng.permutation(len(self.mnist)) if self.n_mnist else None
        inv_stream = self._inv_stream(rng) if self.n_inv else None
        for step in range(self.steps_per_epoch):
            xs, ys = [], []
            if perm is not None:
                idx = perm[step * self.n_mnist : (step + 1) * self.n_mnist]
                xs.append(self.mnist.x[idx])
                ys.append(self.mnist.y[idx])
            if inv_stream is not None:
                j = np.fromiter(inv_stream, dtype=np.int64, count=self.n_inv)
                xs.append(self.inv.x[j])
                ys.append(self.inv.y[j])
            yield Batch(np.concatenate(xs), np.concatenate(ys), self.n_adv)
