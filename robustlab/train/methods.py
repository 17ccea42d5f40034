"""Training methods: how the adversarial rows [0, n_adv) of a batch enter the loss.

Every method pairs a training-time attack (`robustlab.attacks.tf_attacks.make_perturb_fn`) with
a loss; the train step (`robustlab.train.loop.make_train_step`) runs the attack outside the
gradient tape and the loss inside it, whatever the method:

- `pgd` / `fgsm_rs` (Madry et al. 2018 / Wong et al. 2020): rows [0, n_adv) are replaced by their
  adversarials; the loss is the mean cross-entropy over the batch.
- `trades` (Zhang et al. 2019): the model sees the clean batch and the adversarials x' of rows
  [0, n_adv) (found by maximising KL(f(x) || f(x'))); the loss is
  (1/B) sum_i [CE(f(x_i), y_i) + beta * KL(f(x_i) || f(x'_i)) for i < n_adv], i.e. TRADES'
  CE + beta * KL (batch mean) when every row is adversarial, and plain cross-entropy for the
  clean and invariance rows of a mixture. beta = 0 is clean training.

Logits, losses and the KL are float32 whatever the model's compute precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from robustlab.attacks.tf_attacks import PerturbFn, kl_divergence, make_perturb_fn
from robustlab.config import AttackConfig

_MEAN_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@dataclass(frozen=True)
class TrainingMethod:
    """A training-time attack and the loss its adversarial rows enter."""

    name: str
    perturb: PerturbFn | None  # carries `eps_scale` and `seed` (see make_perturb_fn); None: clean
    beta: float = 0.0  # TRADES only

    @classmethod
    def clean(cls) -> TrainingMethod:
        """No attack: every row trains on its clean image."""
        return cls("clean", None)

    @property
    def trades(self) -> bool:
        return self.name == "trades"

    def inputs(self, model: keras.Model, x: tf.Tensor, y: tf.Tensor, n_adv: tf.Tensor) -> tf.Tensor:
        """What the model is trained on: PGD/FGSM-RS: the batch with rows [0, n_adv) attacked;
        TRADES: the clean batch followed by the n_adv adversarials; clean: the batch."""
        if self.perturb is None:
            return x
        x_adv = self.perturb(model, x[:n_adv], y[:n_adv])
        if self.trades:
            return tf.concat([x, x_adv], axis=0)
        return tf.concat([x_adv, x[n_adv:]], axis=0)

    def loss(
        self, y: tf.Tensor, logits: tf.Tensor, n_adv: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(scalar loss, logits of the batch's own rows) from the logits of `inputs`."""
        if not self.trades:
            return _MEAN_CE(y, logits), logits
        batch = tf.shape(y)[0]
        own = logits[:batch]
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=own)
        kl = kl_divergence(logits[:n_adv], logits[batch:])
        total = tf.reduce_sum(ce) + self.beta * tf.reduce_sum(kl)
        return total / tf.cast(batch, tf.float32), own


def make_method(cfg: AttackConfig) -> TrainingMethod:
    """The training method `cfg.method` with its attack (see `make_perturb_fn`)."""
    return TrainingMethod(cfg.method, make_perturb_fn(cfg), float(cfg.trades_beta))
