"""The training optimizer a TrainConfig names (fresh, or to restore a checkpoint into)."""

from __future__ import annotations

import keras

from robustlab.config import TrainConfig

SGD_MOMENTUM = 0.9  # TRADES' and Madry's SGD


def make_optimizer(cfg: TrainConfig) -> keras.optimizers.Optimizer:
    """Adam, or SGD with momentum 0.9, at `cfg.learning_rate` (the loop rescales it per epoch
    under a schedule)."""
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(cfg.learning_rate, momentum=SGD_MOMENTUM)
    return keras.optimizers.Adam(cfg.learning_rate)
